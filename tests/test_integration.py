"""End to end: a real daphne broker, real `python -m workers` processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import json
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import websockets

from tests.procs import ROOT, Broker, WorkerProc, closed_port, scaled, until, wait_for
from workers.requester import Requester, SyncRequester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.fixture
def broker(shared_broker: Broker) -> Broker:
    """The tests here that ask for ``broker`` share one (``shared_broker``: they read
    only their own workers' state); those that stop, restart or configure a broker, or
    count what it wrote, make their own with ``broker_factory``."""
    return shared_broker


# ---------------------------------------------------------------- start it


def test_broker_starts_with_health_admin_and_migrations(broker_factory) -> None:
    broker = broker_factory()
    health = broker.get("/healthz")
    assert health["status"] == "ok" and health["workers"] == 0
    with urllib.request.urlopen(broker.http_url + "/admin/login/", timeout=5) as resp:
        assert resp.status == 200 and b"Django" in resp.read()  # tables migrated, admin served
    assert "Broker ready" in broker.log()
    # it chose its ports (port 0), and says which
    assert f"workers ws://127.0.0.1:{broker.worker_port} " in broker.log()
    assert f"http://127.0.0.1:{broker.http_port} " in broker.log()


def test_a_broker_that_cannot_listen_exits_1_at_once_saying_why(tmp_path: Path) -> None:
    """What a process manager needs: not a log line and exit 0, but a failure."""
    import shutil
    import socket

    from tests.procs import migrated_template, scaled

    shutil.copyfile(migrated_template(), tmp_path / "db.sqlite3")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "manage.py", "runbroker", "--no-migrate", "--worker-port", "0",
             "--requester-port", str(port), "--http-port", "0",
             "--ports-file", str(tmp_path / "ports.json")],
            cwd=ROOT, capture_output=True, text=True, timeout=scaled(60),
            env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"})
    assert out.returncode == 1, out
    [line] = [x for x in out.stderr.splitlines() if "Cannot listen" in x]
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "ports.json").exists()
    assert time.monotonic() - started < scaled(30)


def test_runbroker_help_lists_every_flag() -> None:
    out = subprocess.run([sys.executable, "manage.py", "runbroker", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    for flag in ("--host", "--worker-port", "--requester-port", "--http-port", "--strategy",
                 "--timeout", "--ports-file"):
        assert flag in out


async def test_sockets_routed_by_port_and_by_path(broker: Broker, spawn_worker) -> None:
    spawn_worker("w1")
    # by port: the requester port speaks the requester API
    async with Requester(broker.requester_url) as r:
        assert (await r.call("echo", message="a")) == "Echo: a"
    # by path: the requester API on the worker port and on the HTTP port
    for port in (broker.worker_port, broker.http_port):
        async with Requester(f"ws://127.0.0.1:{port}/ws/requester/") as r:
            assert (await r.call("echo", message="b")) == "Echo: b"


# ---------------------------------------------------------------- workers


def test_worker_registers_what_it_is(broker: Broker, spawn_worker) -> None:
    spawn_worker("gpu-1", "--weight", "2.5", "--max-concurrency", "3", *HANDLERS)
    [info] = broker.workers()
    assert info["name"] == "gpu-1" and info["weight"] == 2.5 and info["max_concurrency"] == 3
    assert {"get_time", "echo", "calculate", "get_system_info", "execute_command", "slow",
            "blocking"} <= set(info["commands"])


def test_builtin_and_user_commands(broker: Broker, spawn_worker) -> None:
    spawn_worker("w1", *HANDLERS)
    with SyncRequester(broker.requester_url) as r:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", r.call("get_time"))
        assert r.call("echo", message="Hello World") == "Echo: Hello World"
        assert r.call("calculate", a=10, b=20, op="+") == 30
        assert r.call("calculate", a=7, b=2, op="/") == 3.5
        zero = r.request("calculate", {"a": 1, "b": 0, "op": "/"})
        assert not zero.success and zero.error == "Division by zero"
        info = r.call("get_system_info")
        assert info["pid"] > 0 and info["hostname"]
        marker = Path(ROOT / "tests" / "should-not-exist")
        ran = r.call("execute_command", command=f"touch {marker}")
        assert ran["executed"] is False and not marker.exists()
        assert r.call("blocking", seconds=0.1) == "slept 0.1"
        boom = r.request("explode")
        assert not boom.success and "kaboom" in boom.error
        assert r.call("echo", message="still alive") == "Echo: still alive"


def test_worker_side_imports_no_django() -> None:
    code = ("import sys, workers.client, workers.requester, workers.__main__;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('django', 'channels', "
            "'dispatch')]; sys.exit(repr(bad) if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_worker_reconnects_and_reregisters_after_broker_restart(broker_factory,
                                                                spawn_worker) -> None:
    broker = broker_factory()
    worker = spawn_worker("w1", target=broker)
    broker.stop(signal.SIGKILL)
    broker.start()  # same ports
    broker.wait_workers(1, timeout=20)
    with SyncRequester(broker.requester_url) as r:
        assert r.call("echo", message="back") == "Echo: back"
    assert worker.proc is not None and worker.proc.poll() is None


# ---------------------------------------------------------------- requests


SEED_EXAMPLE = '''
import asyncio
import websockets
import json
import uuid

async def send_request():
    uri = "ws://localhost:8766"
    async with websockets.connect(uri) as ws:
        # 构建请求
        request = {
            "request_id": str(uuid.uuid4()),
            "command": "get_time",
            "data": {}
        }

        # 发送请求
        await ws.send(json.dumps(request))

        # 接收响应
        response = await ws.recv()
        result = json.loads(response)

        print(f"Success: {result['success']}")
        print(f"Data: {result['data']}")
        print(f"Processed by: {result['processed_by']}")

asyncio.run(send_request())
'''


def _default_ports_free() -> bool:
    import socket

    for port in (8765, 8766, 8000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_seed_python_example_runs_unchanged(tmp_path: Path) -> None:
    """The seed README's example, byte for byte, against a broker on the default ports."""
    if not _default_ports_free():
        pytest.skip("ports 8765/8766/8000 are taken on this machine")
    broker = Broker(tmp_path, worker_port=8765, requester_port=8766, http_port=8000)
    broker.start()
    worker = WorkerProc(broker, "seed-worker").start()
    try:
        broker.wait_workers(1)
        script = tmp_path / "seed_example.py"
        script.write_text(SEED_EXAMPLE, encoding="utf-8")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "Success: True"
        assert re.fullmatch(r"Data: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lines[1])
        assert lines[2].startswith("Processed by: ") and len(lines[2]) > len("Processed by: ")
    finally:
        worker.stop(signal.SIGKILL)
        broker.stop(signal.SIGKILL)


async def test_many_requests_in_flight_on_one_connection(broker: Broker, spawn_worker) -> None:
    spawn_worker("w1", *HANDLERS)
    spawn_worker("w2", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        started = time.monotonic()
        # slower requests first: answers come back as they finish, out of order
        results = await asyncio.gather(*(r.call("slow", seconds=0.5 - i * 0.02, tag=str(i))
                                         for i in range(20)))
        elapsed = time.monotonic() - started
    assert [x["tag"] for x in results] == [str(i) for i in range(20)]
    assert elapsed < 2.5  # concurrent, not 20 x 0.5 s


async def test_requests_sent_in_one_batch_frame_are_answered_in_batch_frames(
        broker: Broker, spawn_worker) -> None:
    """A JSON array of requests is several requests; each is answered once, bad ones
    refused alone, and a peer that batches gets its answers in batch frames."""
    spawn_worker("w1")
    async with websockets.connect(broker.requester_url, max_size=None) as ws:
        await ws.send(json.dumps({"request_id": "alone", "command": "echo",
                                  "data": {"message": "a"}}))
        assert json.loads(await ws.recv())["request_id"] == "alone"  # not batched yet
        batch = [{"request_id": f"b{i}", "command": "echo", "data": {"message": str(i)}}
                 for i in range(20)]
        batch[5] = {"request_id": "bad", "command": 7}
        batch[9] = "not an object"  # type: ignore[call-overload]
        await ws.send(json.dumps(batch))
        answers: dict[str | None, dict] = {}
        frames = 0
        while len(answers) < 20:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            frames += 1
            for answer in frame if isinstance(frame, list) else [frame]:
                assert answer["request_id"] not in answers or answer["request_id"] is None
                answers[answer["request_id"] or f"none{frames}"] = answer
        assert all(answers[f"b{i}"]["success"] and str(i) in json.dumps(answers[f"b{i}"]["data"])
                   for i in range(20) if i not in (5, 9))
        assert "command" in answers["bad"]["error"] and not answers["bad"]["success"]
        assert any("must be a JSON object" in (a.get("error") or "") for a in answers.values())
        assert frames < 20  # gathered
        await ws.send("[]")
        assert "empty array" in json.loads(await ws.recv())["error"]
        await ws.send(json.dumps([{"request_id": "x", "command": "echo"}] * 1001))
        assert "at most 256" in json.loads(await ws.recv())["error"]
        await ws.send(json.dumps([{"request_id": f"big{i}", "command": "echo",
                                   "data": {"message": "z" * 400_000}} for i in range(3)]))
        refused = json.loads(await ws.recv())  # whole: not as if big0 alone was refused
        assert refused["code"] == "too_large" and refused["request_id"] is None


async def test_raw_socket_request_without_id_and_bad_frames(broker: Broker,
                                                            spawn_worker) -> None:
    spawn_worker("w1")
    async with websockets.connect(broker.requester_url, max_size=None) as ws:
        await ws.send(json.dumps({"command": "echo", "data": {"message": "x"}}))
        reply = json.loads(await ws.recv())
        assert reply["success"] and reply["request_id"]  # one was given
        await ws.send("{not json")
        assert "Malformed JSON" in json.loads(await ws.recv())["error"]
        await ws.send(json.dumps({"request_id": "big", "command": "echo",
                                  "data": {"message": "x" * 1_100_000}}))
        big = json.loads(await ws.recv())
        assert big["request_id"] == "big" and "Message too large" in big["error"]
        await ws.send(b"\x00binary")
        assert "Binary frames" in json.loads(await ws.recv())["error"]
        await ws.send(json.dumps({"request_id": "ok", "command": "echo", "data": {}}))
        assert json.loads(await ws.recv())["request_id"] == "ok"


def test_requester_cli_one_shot_and_console(broker: Broker, spawn_worker) -> None:
    spawn_worker("w1")
    cli = [sys.executable, "-m", "workers.requester", "127.0.0.1", str(broker.requester_port)]
    one = subprocess.run([*cli, "calculate", '{"a": 10, "b": 20, "op": "+"}'], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert one.returncode == 0 and json.loads(one.stdout)["data"] == 30
    console = subprocess.run(cli, cwd=ROOT, input='request get_time\nrequest calculate '
                             '{"a": 10, "b": 20, "op": "*"}\nrequest calculate {bad\nquit\n',
                             capture_output=True, text=True, timeout=30)
    assert console.returncode == 0 and "200" in console.stdout
    assert "Traceback" not in console.stdout + console.stderr


# ---------------------------------------------------------------- balancing and failure


def test_round_robin_cycles_over_all_workers(broker_factory, tmp_path: Path) -> None:
    broker = broker_factory(args=["--strategy", "round_robin"])
    workers = [WorkerProc(broker, f"rr{i}").start() for i in range(3)]
    try:
        broker.wait_workers(3)
        with SyncRequester(broker.requester_url) as r:
            served = Counter(r.request("echo", {"message": i}).processed_by for i in range(30))
        assert sorted(served.values()) == [10, 10, 10]
    finally:
        for w in workers:
            w.stop(signal.SIGKILL)


async def test_least_loaded_spreads_concurrent_work(broker: Broker, spawn_worker) -> None:
    for i in range(3):
        spawn_worker(f"ll{i}", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        answers = await asyncio.gather(*(r.request("slow", {"seconds": 0.3}) for _ in range(9)))
    assert Counter(a.processed_by for a in answers).most_common(1)[0][1] <= 4


async def test_max_concurrency_holds_and_the_rest_wait(broker: Broker, spawn_worker) -> None:
    spawn_worker("narrow", "--max-concurrency", "2", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        started = time.monotonic()
        answers = await asyncio.gather(*(r.request("slow", {"seconds": 0.4}) for _ in range(6)))
        elapsed = time.monotonic() - started
    assert all(a.success for a in answers)
    assert elapsed >= 1.15  # 6 requests, 2 at a time, 0.4 s each: three rounds


async def test_no_worker_error_is_immediate_and_timeouts_are_settable(
        broker_factory, tmp_path: Path) -> None:
    broker = broker_factory(args=["--timeout", "0.5"])
    async with Requester(broker.requester_url) as r:
        started = time.monotonic()
        none = await r.request("echo")
        assert none.error == "No available workers" and time.monotonic() - started < 0.5
        worker = WorkerProc(broker, "sleepy", list(HANDLERS)).start()
        try:
            broker.wait_workers(1)
            slow = await r.request("slow", {"seconds": 3})  # global --timeout 0.5
            assert slow.error == "Worker response timeout"
            per_request = await r.request("slow", {"seconds": 0.8}, timeout=2)
            assert per_request.success
            quick = await r.request("slow", {"seconds": 0.5}, timeout=0.2)
            assert quick.error == "Worker response timeout"
            await until(lambda: "does not hold" in broker.log(), 5, "late answers logged")
        finally:
            worker.stop(signal.SIGKILL)


async def test_kill_9_worker_with_requests_in_flight_fails_over(broker: Broker,
                                                                spawn_worker) -> None:
    victim = spawn_worker("victim", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        calls = [asyncio.ensure_future(r.request("slow", {"seconds": 1.0, "tag": str(i)}))
                 for i in range(10)]
        await until(lambda: sum(w["in_flight"] for w in broker.workers()) == 10, 5,
                    "10 requests in flight")
        spawn_worker("survivor", *HANDLERS)
        victim.stop(signal.SIGKILL)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert all(a.success for a in answers), [a.error for a in answers]
    assert {a.processed_by for a in answers} == {
        w["worker_id"] for w in broker.workers() if w["name"] == "survivor"}


async def test_kill_9_last_worker_gives_explicit_error(broker: Broker, spawn_worker) -> None:
    victim = spawn_worker("only", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        call = asyncio.ensure_future(r.request("slow", {"seconds": 5}))
        await until(lambda: broker.workers()[0]["in_flight"] == 1, 5, "request in flight")
        started = time.monotonic()
        victim.stop(signal.SIGKILL)
        answer = await asyncio.wait_for(call, 10)
    assert not answer.success and answer.error.startswith("Worker lost")
    assert time.monotonic() - started < 3


async def test_frozen_worker_is_detected_and_its_work_moves(broker: Broker,
                                                            spawn_worker) -> None:
    frozen = spawn_worker("frozen", *HANDLERS)
    async with Requester(broker.requester_url) as r:
        call = asyncio.ensure_future(r.request("slow", {"seconds": 0.5}))
        await until(lambda: broker.workers()[0]["in_flight"] == 1, 5, "request in flight")
        frozen.send_signal(signal.SIGSTOP)
        spawn_worker("thawed", *HANDLERS, wait=False)
        try:
            started = time.monotonic()
            answer = await asyncio.wait_for(call, 10)
            detected = time.monotonic() - started
        finally:
            frozen.send_signal(signal.SIGCONT)
    assert answer.success and detected < 5  # heartbeat 0.5 s x 3 misses, not the 30 s timeout
    assert [w["name"] for w in broker.workers()] == ["thawed"] or answer.processed_by != frozen


# ---------------------------------------------------------------- both directions, operate


def test_management_commands_act_through_the_running_broker(broker: Broker,
                                                            spawn_worker) -> None:
    worker = spawn_worker("w1")
    [info] = broker.workers()
    # one process for the commands that read no input (a Django start each is a second)
    listing, sent, called, cast, failing = broker.manage_many(
        ["workers"], ["send", info["worker_id"], "calculate", '{"a": 2, "b": 3, "op": "*"}'],
        ["call", "echo", '{"message": "hi"}'], ["broadcast", "maintenance at noon"],
        ["call", "nope"])
    assert listing.returncode == 0 and "w1" in listing.stdout
    assert sent.returncode == 0 and json.loads(sent.stdout)["data"] == 6
    assert called.returncode == 0 and json.loads(called.stdout)["data"] == "Echo: hi"
    assert cast.returncode == 0
    wait_for(lambda: "maintenance at noon" in worker.log(), 5, "worker to log the broadcast")
    console = broker.manage("console", input="list\nbroadcast hello all\nquit\n")
    assert console.returncode == 0 and "w1" in console.stdout
    assert failing.returncode != 0 and "No available workers" in failing.stdout + failing.stderr


def test_management_command_without_broker_fails_loudly(tmp_path: Path) -> None:
    with closed_port() as port:  # held, so nothing listens there meanwhile
        out = Broker(tmp_path, http_port=port).manage("workers")
    assert out.returncode != 0 and "Cannot reach the broker" in out.stderr


def test_history_and_registrations_land_in_the_database(broker_factory, spawn_worker) -> None:
    import sqlite3

    broker = broker_factory()
    spawn_worker("w1", target=broker)
    with SyncRequester(broker.requester_url) as r:
        for i in range(25):
            r.call("echo", message=i)
        r.request("calculate", {"a": 1, "b": 0, "op": "/"})
    db = sqlite3.connect(broker.workdir / "broker.sqlite3")

    def rows() -> int:
        return db.execute("select count(*) from dispatch_requestrecord").fetchone()[0]

    wait_for(lambda: rows() == 26, 10, "26 history rows")
    failed = db.execute("select command, error, worker_id, attempts from dispatch_requestrecord "
                        "where success = 0").fetchall()
    assert failed[0][:2] == ("calculate", "Division by zero") and failed[0][3] == 1
    sessions = db.execute("select name, status, commands from dispatch_workersession").fetchall()
    assert sessions[0][0] == "w1" and sessions[0][1] == "online" and "echo" in sessions[0][2]


async def test_worker_calls_the_broker_and_custom_messages(broker: Broker) -> None:
    from workers.client import Worker
    from workers.protocol import Message

    worker = Worker(broker.worker_url, name="inproc")
    seen: list[Message] = []
    worker.on("notification")(lambda msg: seen.append(msg))
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        assert await worker.request("calculate", {"a": 10, "b": 20, "op": "+"}) == 30
        assert re.fullmatch(r"\d{4}-.*", await worker.request("get_time"))
        info = await worker.request("get_client_info")
        assert info["count"] == 1 and info["workers"][0]["name"] == "inproc"
        await asyncio.to_thread(broker.manage, "broadcast", '{"kind": "reload"}')
        await asyncio.wait_for(_until(lambda: seen), 5)
        assert seen[0].data["message"] == {"kind": "reload"}
    finally:
        await worker.stop()
        task.cancel()


async def _until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


def test_the_worker_consoles_log_lines_do_not_land_after_its_prompt(shared_broker: Broker
                                                                     ) -> None:
    """On a terminal, "Registered as ..." comes after the prompt was drawn: it takes
    the prompt's line, and the prompt is drawn again below it."""
    import pty

    main, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "workers", shared_broker.host,
                             str(shared_broker.worker_port), "--name", "prompted", "--console",
                             "--log-level", "INFO"], cwd=ROOT, stdin=secondary,
                            stdout=secondary, stderr=secondary,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(secondary)
    screen = b""
    try:
        deadline = time.monotonic() + scaled(20)
        while b"Registered as" not in screen or not screen.rstrip(b" ").endswith(b">"):
            assert time.monotonic() < deadline, screen
            if select.select([main], [], [], 0.2)[0]:
                screen += os.read(main, 4096)
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
    text = screen.decode()
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1].replace("\x1b[K", "")
             for line in text.split("\n")]  # what the terminal shows on each line
    registered = next(line for line in shown if "Registered as" in line)
    assert registered.split()[2] == "INFO", shown  # the log line starts its own line
    assert shown[-1] == "> ", shown  # and the prompt is drawn again below it


def test_the_worker_console_asks_the_broker_itself(broker: Broker) -> None:
    """The seed's ``client.start(enable_console=True)``: ``python -m workers --console``."""
    script = ('request get_time\nrequest calculate {"a": 10, "b": 20, "op": "+"}\n'
              'request calculate {"a": 1, "b": 0, "op": "/"}\nrequest calculate {oops\n'
              'help\nquit\n')
    out = subprocess.run([sys.executable, "-m", "workers", broker.host,
                          str(broker.worker_port), "--name", "consoled", "--console"],
                         cwd=ROOT, input=script, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r'\{"success": true, "data": "\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"\}',
                        lines[0]), lines
    assert lines[1] == '{"success": true, "data": 30}'
    assert json.loads(lines[2]) == {"success": False, "error": "Division by zero",
                                    "code": "command_error"}
    assert lines[3].startswith("Not sent: bad JSON data")
    assert "request COMMAND [JSON]" in out.stdout  # the help
