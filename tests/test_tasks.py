"""Django tasks on the fleet, end to end: a real broker, a ``manage.py fleetworker`` and
a plain worker in processes of their own, and a Django "web process" (neither of
them) whose view enqueues tasks through ``dispatch.tasks.FleetBackend`` and reads
their results from the broker's database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dispatch.tasks import our_priority
from tests.procs import ROOT, Broker, WorkerProc, _stop, scaled, wait_for

pytestmark = [pytest.mark.timeout(120)]

#: The web process: Django set up against the broker's database, the code of a test
#: run, and what it leaves in ``out`` printed as JSON.
WEB = r"""
import json, os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
import django
django.setup()
from django.test import RequestFactory
from tests import sample_tasks, sample_views

def until(result, done, seconds=20):
    end = time.time() + seconds
    while not done(result) and time.time() < end:
        time.sleep(0.02)
        result.refresh()
    return result

def view(name, **query):
    response = getattr(sample_views, name)(RequestFactory().get("/", query))
    return json.loads(response.content)

out = {}
exec(compile(sys.stdin.read(), "test", "exec"))
print(json.dumps(out, default=str))
"""


class Fleet:
    """A broker, a fleetworker (queue "default"), a plain worker (echo)."""

    def __init__(self, workdir: Path) -> None:
        self.signals = workdir / "signals.jsonl"
        self.marker = workdir / "imported.txt"  # tests/import_marker.py writes it
        os.environ["IMPORT_MARKER"] = str(self.marker)  # (inherited by every process here)
        self.broker = Broker(workdir, env={"TASK_SIGNALS_FILE": str(self.signals),
                                           "BROKER_TASK_QUEUES": "default,other",
                                           "BROKER_TASK_MODULES": "tests.sample_tasks"}).start()
        self.fleetworker = self.start_fleetworker("fw")
        self.plain = WorkerProc(self.broker, "plain").start()
        self.broker.wait_workers(2)

    def start_fleetworker(self, name: str, *args: str, env: dict[str, str] | None = None
                          ) -> subprocess.Popen:
        log = (self.broker.workdir / f"fleetworker-{name}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "manage.py", "fleetworker", self.broker.worker_url, "--name", name,
             *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "DATABASE_URL": f"sqlite:///{self.broker.db_path}",
                 "BROKER_TASK_MODULES": "tests.sample_tasks", **(env or {})})

    def web(self, code: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", WEB], cwd=ROOT, input=code, capture_output=True, text=True,
            timeout=scaled(timeout),
            env={**os.environ, "DATABASE_URL": f"sqlite:///{self.broker.db_path}",
                 "BROKER_FLEET_URL": self.broker.requester_url + "/",
                 "BROKER_TASK_QUEUES": "default,other", **(env or {})})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        _stop(self.fleetworker, signal.SIGKILL)
        self.plain.stop()
        self.broker.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    started = Fleet(tmp_path_factory.mktemp("tasks"))
    yield started
    started.stop()


def test_a_view_enqueues_a_task_that_a_fleetworker_runs(fleet: Fleet) -> None:
    out = fleet.web("""
started = time.perf_counter()
answer = view("start_add", a=2, b=3)
out["enqueue_ms"] = (time.perf_counter() - started) * 1000
out["answer"] = answer
result = until(sample_tasks.add.get_result(answer["id"]), lambda r: r.is_finished)
out["status"], out["value"] = result.status, result.return_value
out["workers"], out["attempts"] = result.worker_ids, result.attempts
out["args"], out["order"] = result.args, [result.enqueued_at <= result.started_at
                                           <= result.finished_at]
out["backend"] = result.backend
from dispatch import fleet
out["call"] = fleet.call("echo", {"message": "hi"}, timeout=5)
try:
    fleet.call("nobody-offers-this", {})
except Exception as exc:
    out["call_error"] = type(exc).__name__
r2 = until(sample_tasks.whoami.enqueue(note="hi"), lambda r: r.is_finished)
out["context"] = r2.return_value
out["context_id"] = r2.id
""")
    assert out["answer"]["status"] == "READY"
    assert out["call"] == "Echo: hi" and out["call_error"] == "NoWorkers"  # dispatch.fleet
    assert out["status"] == "SUCCESSFUL" and out["value"] == 5
    assert len(out["workers"]) == 1 and out["attempts"] == 1 and out["args"] == [2, 3]
    assert out["order"] == [True] and out["backend"] == "default"
    workers = {w["name"]: w["worker_id"] for w in fleet.broker.workers()}
    assert out["workers"] == [workers["fw"]]  # the fleetworker, not the plain worker
    # The task's context: its own result id, first attempt.
    assert out["context"] == {"id": out["context_id"], "attempt": 1, "note": "hi"}
    assert out["enqueue_ms"] < 1000  # stored before it returns (a few ms; see the note)


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_results_go_through_every_status(fleet: Fleet) -> None:
    out = fleet.web("""
from datetime import timedelta
from django.utils import timezone
deferred = sample_tasks.add.using(run_after=timezone.now() + timedelta(seconds=1.5))
later = deferred.enqueue(1, 1)
out["ready"] = str(sample_tasks.add.get_result(later.id).status)
import asyncio
from dispatch import fleet
watched = sample_tasks.slow.enqueue(0.3)  # watched on the connection that sent it

async def watch(job_id):
    return [event async for event in fleet.awatch(job_id, timeout=10)]

events = asyncio.run(watch(watched.id))
out["watched"] = [events[-1]["event"], events[-1]["data"],
                  sum(e["event"] == "progress" for e in events) > 0]
slow = sample_tasks.slow.enqueue(1.0)
until(slow, lambda r: r.status == "RUNNING" and r.progress)
out["running"], out["progress"] = str(slow.status), slow.progress
until(slow, lambda r: r.is_finished)
out["slow"] = [str(slow.status), slow.return_value]
until(later, lambda r: r.is_finished)
out["later"] = [str(later.status), later.return_value,
                (later.started_at - later.enqueued_at).total_seconds()]
failed = until(sample_tasks.fails.enqueue("boom"), lambda r: r.is_finished)
out["failed"] = [str(failed.status), failed.errors[0].exception_class_path,
                 failed.errors[0].traceback, failed.errors[0].exception_class.__name__]
async_one = until(sample_tasks.async_add.enqueue(20, 22), lambda r: r.is_finished)
out["async"] = async_one.return_value
cancelled = sample_tasks.slow.enqueue(20)
until(cancelled, lambda r: r.status == "RUNNING")
cancelled.cancel()
until(cancelled, lambda r: r.is_finished)
out["cancelled"] = [str(cancelled.status), cancelled.errors[0].exception_class_path]
command = until(sample_tasks.echo.enqueue(message="hi"), lambda r: r.is_finished)
out["command"] = [str(command.status), command.return_value, command.worker_ids]
try:
    sample_tasks.add.get_result("no-such-id")
except Exception as exc:
    out["missing"] = type(exc).__name__
""")
    assert out["ready"] == "READY"
    assert out["watched"] == ["result", 0.3, True]
    assert out["running"] == "RUNNING" and 0 < out["progress"][0] <= 1
    assert out["slow"] == ["SUCCESSFUL", 1.0]
    assert out["later"][:2] == ["SUCCESSFUL", 2] and out["later"][2] >= 1.4
    status, path, trace, name = out["failed"]
    assert status == "FAILED" and path == "builtins.ValueError" and name == "ValueError"
    assert "raise ValueError(text)" in trace and "boom" in trace
    assert out["async"] == 42
    assert out["cancelled"] == ["FAILED", "workers.errors.Cancelled"]
    # The cancelled task stopped at its next report (every 2 s): its slot is free.
    wait_for(lambda: [w["in_flight"] for w in fleet.broker.workers() if w["name"] == "fw"]
             == [0], 4, "the cancelled task to stop")
    workers = {w["name"]: w["worker_id"] for w in fleet.broker.workers()}
    assert out["command"] == ["SUCCESSFUL", "Echo: hi", [workers["plain"]]]
    assert out["missing"] == "TaskResultDoesNotExist"


def test_the_broker_sends_task_started_and_finished(fleet: Fleet) -> None:
    out = fleet.web("""
result = until(sample_tasks.add.enqueue(5, 5), lambda r: r.is_finished)
out["id"] = result.id
""")
    def seen() -> list[list[str]]:
        lines = fleet.signals.read_text().splitlines() if fleet.signals.exists() else []
        return [s for s in map(json.loads, lines) if s[2] == out["id"]]
    wait_for(lambda: len(seen()) == 2, 10, "the task's two signals")
    assert seen() == [["started", "add", out["id"], "RUNNING"],
                      ["finished", "add", out["id"], "SUCCESSFUL"]]


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_task_waits_for_a_worker_of_its_queue(fleet: Fleet) -> None:
    out = fleet.web("""
other = sample_tasks.add.using(queue_name="other").enqueue(7, 8)
out["id"] = other.id
time.sleep(0.5)
out["before"] = str(sample_tasks.add.get_result(other.id).status)
""")
    assert out["before"] == "READY"  # no worker serves "other": it waits, not fails
    late = fleet.start_fleetworker("other-fw", "--queue", "other")
    try:
        out = fleet.web(f"""
result = until(sample_tasks.add.get_result({out["id"]!r}), lambda r: r.is_finished)
out["after"] = [str(result.status), result.return_value]
""")
        assert out["after"] == ["SUCCESSFUL", 15]
    finally:
        _stop(late)


def test_enqueue_on_commit_waits_for_the_transaction(fleet: Fleet) -> None:
    out = fleet.web("""
from django.db import transaction
from dispatch.models import Job
before = Job.objects.filter(task="tests.sample_tasks.add").count()
with transaction.atomic():
    view("start_after_commit")
    out["inside"] = Job.objects.filter(task="tests.sample_tasks.add").count() - before
time.sleep(0.3)
out["after"] = Job.objects.filter(task="tests.sample_tasks.add").count() - before
try:
    with transaction.atomic():
        view("start_after_commit")
        raise RuntimeError("rolled back")
except RuntimeError:
    pass
time.sleep(0.3)
out["rolled_back"] = Job.objects.filter(task="tests.sample_tasks.add").count() - before
""")
    assert out == {"inside": 0, "after": 1, "rolled_back": 1}


def test_a_peer_cannot_make_a_fleetworker_or_the_broker_import_a_module(fleet: Fleet) -> None:
    """A task's path comes from the request: a module not loaded at start is refused,
    never imported (an import runs code: any module on the path would do)."""
    import asyncio

    from workers.requester import Requester

    async def ask() -> tuple[Any, Any]:
        async with Requester(fleet.broker.requester_url) as requester:
            answer = await requester.request("task:default",
                                             {"task": "tests.import_marker.anything"})
            bad_args = await requester.request("task:default", {
                "task": "tests.sample_tasks.add", "args": "ab"})
            job = await requester.start("echo", {"message": "x"},
                                        task="tests.import_marker.anything")
            assert bad_args.code == "bad_params", bad_args  # not add("a", "b")
            return answer, await job.result()

    answer, plain = asyncio.run(ask())
    assert answer.code == "bad_params" and "is not a task this fleetworker knows" in answer.error
    assert plain == "Echo: x"  # a plain job naming it: the broker's task signals skip it
    time.sleep(0.3)  # (the broker's signals run in a thread of their own)
    assert not fleet.marker.exists()


def test_an_answer_too_large_fails_alone(fleet: Fleet) -> None:
    """A task's answer over what the broker's server takes in a frame fails that task,
    not the fleetworker's connection and every other task on it."""
    out = fleet.web("""
slow = sample_tasks.slow.enqueue(1.0)
big = until(sample_tasks.big.enqueue(6_000_000), lambda r: r.is_finished)
until(slow, lambda r: r.is_finished)
out["big"] = [str(big.status), big.errors[0].traceback[:200]]
out["slow"] = [str(slow.status), slow.worker_ids]
""")
    assert out["big"][0] == "FAILED" and "Worker answer too large" in out["big"][1]
    assert out["slow"][0] == "SUCCESSFUL" and len(out["slow"][1]) == 1  # not lost, not re-run


@pytest.mark.django_db
def test_a_result_is_read_from_its_own_credentials_row() -> None:
    """Another credential may send a job with a task's id (ids are no secret): its row
    neither forges nor freezes the task's result."""
    from django.utils import timezone

    from dispatch.models import Job
    from tests import sample_tasks

    now = timezone.now()
    common = {"request_id": "t-1", "command": "task:default", "task": "tests.sample_tasks.add",
              "deadline": now, "request": '{"data": {"args": [1, 2], "kwargs": {}}}'}
    Job.objects.create(key="mine", owner="anonymous", state="done", created_at=now,
                       answer='{"success": true, "data": 3}', **common)
    Job.objects.create(key="forged", owner="credential:9", state="done", created_at=now,
                       answer='{"success": true, "data": "FORGED"}', **common)
    Job.objects.create(key="frozen", owner="credential:8", state="queued", created_at=now,
                       **common)
    result = sample_tasks.add.get_result("t-1")
    assert (str(result.status), result.return_value) == ("SUCCESSFUL", 3)


def test_priorities_map_onto_the_brokers() -> None:
    assert [our_priority(p) for p in (-100, -50, 0, 50, 99, 100)] == [0, 2, 4, 6, 8, 9]


def test_check_reports_bad_options() -> None:
    from dispatch.tasks import FleetBackend

    backend = FleetBackend("x", {"QUEUES": ["default"], "OPTIONS": {
        "TIMEOUT": 0, "SELECT": {"gpu": {"gpu": "a100"}}, "RETRIES": 3}})
    ids = sorted(m.id for m in backend.check())
    assert ids == ["dispatch.T001", "dispatch.T002", "dispatch.T004"]
    assert FleetBackend("y", {}).check() == []


def test_a_fleet_command_task_takes_keyword_arguments_only() -> None:
    from dispatch.tasks.compat import InvalidTask
    from tests import sample_tasks

    with pytest.raises(InvalidTask, match="keyword arguments only"):
        sample_tasks.echo.enqueue("positional")


def test_the_django_page_examples_run(fleet: Fleet, tmp_path: Path) -> None:
    """docs/django.md's myapp (tasks, a view and its progress page's consumer), as the
    page prints it: a fleetworker runs its task, a worker its 'train' command (the
    long-jobs page's), and the consumer pushes the job's progress, then its result."""
    from tests.test_readme import PAGES, code_blocks

    app = tmp_path / "myapp"
    app.mkdir()
    (app / "__init__.py").write_text("")
    for block in code_blocks("python", PAGES[ROOT / "docs" / "django.md"]):
        first = block.splitlines()[0]
        if first.startswith("# myapp/"):
            (tmp_path / first[2:]).write_text(block)
    assert sorted(p.name for p in app.iterdir()) == [
        "__init__.py", "consumers.py", "tasks.py", "views.py"]
    jobs = code_blocks("python", PAGES[ROOT / "docs" / "long-jobs.md"])[0]
    (tmp_path / "jobs.py").write_text(jobs)
    path = os.pathsep.join([str(ROOT), str(tmp_path)])
    trainer = WorkerProc(fleet.broker, "trainer", ["--handlers", "jobs"],
                         env={"PYTHONPATH": path}).start()
    docs_fw = fleet.start_fleetworker("docs-fw", "--queue", "docs", "--tasks", "myapp.tasks",
                                      env={"PYTHONPATH": path})
    try:
        out = fleet.web("""
import asyncio, re
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.urls import path
from myapp import consumers, tasks, views
result = until(tasks.thumbnail.using(queue_name="docs").enqueue("a.png", width=128),
               lambda r: r.is_finished)
out["task"] = [str(result.status), result.return_value, list(result.progress)]
page = views.start_training(RequestFactory().get("/")).content.decode()
job_id = re.search(r"/ws/jobs/([^/]+)/", page)[1]

async def watch():
    app = URLRouter([path("ws/jobs/<str:job_id>/", consumers.JobProgress.as_asgi())])
    socket = WebsocketCommunicator(app, f"/ws/jobs/{job_id}/")
    assert (await socket.connect(timeout=10))[0]
    events = []
    while not events or events[-1]["event"] != "result":
        events.append(await socket.receive_json_from(timeout=20))
    await socket.disconnect()
    return events

out["events"] = asyncio.run(watch())
""", env={"PYTHONPATH": path, "BROKER_TASK_QUEUES": "default,other,docs"})
    finally:
        _stop(docs_fw)
        trainer.stop()
    assert out["task"] == ["SUCCESSFUL", {"path": "a.png", "width": 128}, [1.0, "step 4 of 4"]]
    events = out["events"]
    assert events[-1] == {"event": "result", "success": True, "data": {"epochs": 5},
                          "error": None, "code": None}
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(0 < e["progress"] <= 1 for e in progress)


def test_manage_check_runs_the_backends_check() -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError
    from django.test import override_settings

    bad = {"default": {"BACKEND": "dispatch.tasks.FleetBackend", "OPTIONS": {"KEEP": -1}}}
    with override_settings(TASKS=bad), pytest.raises(SystemCheckError, match="dispatch.T002"):
        call_command("check")


def test_a_schedule_runs_a_django_task(fleet: Fleet) -> None:
    """A schedule naming a task fires it as the backend would enqueue it: a fleetworker
    runs it, and its result is read like any task's."""
    out = fleet.web("""
from dispatch.models import Schedule
schedule = Schedule.objects.create(name="adds", task="tests.sample_tasks.add",
                                   data={"a": 1, "b": 2}, every=1)
end = time.time() + 20
while not schedule.last_request_id and time.time() < end:
    time.sleep(0.1)
    schedule.refresh_from_db()
result = until(sample_tasks.add.get_result(schedule.last_request_id), lambda r: r.is_finished)
out["result"] = [str(result.status), result.return_value, result.kwargs]
Schedule.objects.filter(pk=schedule.pk).delete()
""")
    assert out["result"] == ["SUCCESSFUL", 3, {"a": 1, "b": 2}]
