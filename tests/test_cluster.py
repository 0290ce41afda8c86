"""Several broker processes sharing Redis (and PostgreSQL): one broker to the outside."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pytest
import websockets

from tests.procs import ROOT, Broker, WorkerProc, free_port_rows, scaled, until, wait_for
from workers.requester import Requester, SyncRequester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., list[Broker]]]:
    """``make(n, args=[...], env={...})`` starts n brokers sharing one Redis prefix."""
    started: list[Broker] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def make(n: int = 2, args: list[str] | None = None, env: dict[str, str] | None = None,
             url: str | None = None) -> list[Broker]:
        shared = {"REDIS_URL": url or redis_url, "BROKER_REDIS_PREFIX": prefix, **(env or {})}
        brokers = [Broker(tmp_path, env=shared, args=args or []) for _ in range(n)]
        for broker in brokers:
            started.append(broker)
            broker.start()
        return brokers

    yield make
    for broker in started:
        broker.stop(signal.SIGKILL)


@pytest.fixture
def workers_started() -> Iterator[list[WorkerProc]]:
    started: list[WorkerProc] = []
    yield started
    for worker in started:
        worker.stop(signal.SIGKILL)


def start_worker(started: list[WorkerProc], broker: Broker, name: str, *args: str
                 ) -> WorkerProc:
    worker = WorkerProc(broker, name, [*HANDLERS, *args]).start()
    started.append(worker)
    wait_for(lambda: any(w["name"] == name for w in broker.workers()), 15,
             f"worker {name} to register\n{worker.log()}")
    return worker


def test_worker_on_one_process_serves_requesters_and_commands_on_another(
        cluster, workers_started) -> None:
    a, b = cluster(2)
    worker = start_worker(workers_started, a, "on-a")
    with SyncRequester(b.requester_url) as r:
        answer = r.request("echo", {"message": "across"})
        assert answer.success and answer.data == "Echo: across"
        # Integers beyond 64 bits cross processes exact (the broker keeps them as text).
        huge = [10**30, -(10**40), int("9" * 4300)]
        answer = r.request("echo", {"message": huge})
    assert answer.success and answer.data == f"Echo: {huge}", answer.error
    [info] = b.workers()  # b sees the worker a holds, and says which process holds it
    assert info["name"] == "on-a" and info["process"] == a.get("/healthz")["process"]
    listing, sent, cast = b.manage_many(
        ["workers"], ["send", info["worker_id"], "calculate", '{"a": 6, "b": 7, "op": "*"}'],
        ["broadcast", "hello from b"])
    assert listing.returncode == 0 and "on-a" in listing.stdout
    assert sent.returncode == 0 and '"data": 42' in sent.stdout
    assert cast.returncode == 0
    wait_for(lambda: "hello from b" in worker.log(), 5, "worker on a to get b's broadcast")
    # b's dashboard shows the fleet of every process; its metrics count its own workers
    snapshot = asyncio.run(first_dashboard_snapshot(b))
    assert [(w["name"], w["process"]) for w in snapshot["workers"]] == \
        [("on-a", info["process"])]
    assert "broker_workers{state=\"online\"} 0.0" in b.text("/metrics")
    assert "broker_workers{state=\"online\"} 1.0" in a.text("/metrics")


async def first_dashboard_snapshot(broker: Broker) -> dict:
    async with websockets.connect(f"ws://{broker.host}:{broker.http_port}/ws/dashboard/") as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_round_robin_is_global(cluster, workers_started) -> None:
    a, b = cluster(2, args=["--strategy", "round_robin"])
    for name, broker in (("w1", a), ("w2", a), ("w3", b)):
        start_worker(workers_started, broker, name)
    served: Counter[str] = Counter()
    with SyncRequester(a.requester_url) as ra, SyncRequester(b.requester_url) as rb:
        for i in range(30):
            served[(ra if i % 2 else rb).request("echo", {"message": i}).processed_by] += 1
    assert sorted(served.values()) == [10, 10, 10]


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_max_concurrency_holds_across_processes(cluster, workers_started) -> None:
    a, b = cluster(2)
    start_worker(workers_started, a, "narrow", "--max-concurrency", "2")
    peak = 0

    def watch() -> bool:
        nonlocal peak
        peak = max(peak, sum(w["in_flight"] for w in a.workers()))
        return False

    async with Requester(a.requester_url) as ra, Requester(b.requester_url) as rb:
        started = time.monotonic()
        calls = asyncio.gather(*(r.request("slow", {"seconds": 0.4})
                                 for r in (ra, rb, ra, rb, ra, rb)))
        watcher = asyncio.ensure_future(asyncio.to_thread(
            lambda: [watch() or time.sleep(0.05) for _ in range(20)]))
        answers = await calls
        elapsed = time.monotonic() - started
        await watcher
    assert all(x.success for x in answers), [x.error for x in answers]
    assert peak <= 2 and elapsed >= 1.15  # two at a time, three rounds


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_kill_9_of_a_broker_process(cluster, workers_started) -> None:
    a, b = cluster(2)
    # the worker knows both brokers: after a dies it reconnects to b
    start_worker(workers_started, a, "roamer", "--url", b.worker_url)
    async with Requester(b.requester_url) as rb:
        calls = [asyncio.ensure_future(rb.request("slow", {"seconds": 1.0, "tag": str(i)}))
                 for i in range(5)]
        await until(lambda: sum(w["in_flight"] for w in b.workers()) == 5, 5,
                    "5 requests in flight through a")
        started = time.monotonic()
        a.stop(signal.SIGKILL)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 20)
        took = time.monotonic() - started
    assert all(x.success for x in answers), [x.error for x in answers]
    assert took < 10  # re-dispatched long before the 30 s timeout
    [info] = b.workers()
    assert info["name"] == "roamer" and info["process"] == b.get("/healthz")["process"]


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_redis_restart_while_brokers_run(cluster, workers_started, redis_server) -> None:
    a, b = cluster(2, url=redis_server.url)
    start_worker(workers_started, a, "steady")
    async with Requester(b.requester_url) as rb:
        assert (await rb.request("echo", {"message": "before"})).success
        redis_server.stop()
        during = await asyncio.wait_for(rb.request("echo", {"message": "during"},
                                                   timeout=2), 10)
        assert not during.success  # an explicit error, not a hang
        await asyncio.sleep(1.0)
        redis_server.start()

        async def served() -> bool:
            return (await rb.request("echo", {"message": "after"}, timeout=2)).success

        deadline = time.monotonic() + 20
        while not await served():
            assert time.monotonic() < deadline, f"no recovery\n{a.log()[-2000:]}"
            await asyncio.sleep(0.5)
    for broker in (a, b):
        assert broker.proc is not None and broker.proc.poll() is None
    assert "unavailable" in (a.log() + b.log()).lower()


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_runbroker_processes_flag(tmp_path: Path, redis_url: str, stop_signal: int) -> None:
    step = 7
    ports = free_port_rows(3, step, 2)
    env = {**os.environ, "REDIS_URL": redis_url,
           "BROKER_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "BROKER_HEARTBEAT_INTERVAL": "0.5"}
    ports_file = tmp_path / "ports.json"
    cmd = [sys.executable, "manage.py", "runbroker", "--processes", "2", "--port-step",
           str(step), "--worker-port", str(ports[0]), "--requester-port", str(ports[1]),
           "--http-port", str(ports[2]), "--ports-file", str(ports_file)]
    log_path = tmp_path / "cluster.log"
    parent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("wb"),
                              stderr=subprocess.STDOUT)

    def listening() -> dict | None:
        if parent.poll() is not None:  # e.g. a port taken meanwhile: it says so at once
            pytest.fail(f"runbroker exited with {parent.returncode}:\n"
                        f"{log_path.read_text(errors='replace')}")
        return json.loads(ports_file.read_text()) if ports_file.exists() else None

    worker = None
    try:
        # Two processes importing Django at once on a loaded machine: give them time.
        told = wait_for(listening, 60, "both processes to listen")["processes"]
        assert [(p["worker"], p["requester"], p["http"]) for p in told] == [
            (ports[0] + i * step, ports[1] + i * step, ports[2] + i * step) for i in range(2)]
        first, second = (Broker(tmp_path, worker_port=p["worker"],
                                requester_port=p["requester"], http_port=p["http"])
                         for p in told)
        for broker in (first, second):
            wait_for(lambda: broker.get("/healthz")["status"] == "ok", 10,
                     f"process on port {broker.http_port}")
        assert first.get("/healthz")["process"] != second.get("/healthz")["process"]
        worker = WorkerProc(first, "w").start()
        wait_for(lambda: len(second.workers()) == 1, 15, "worker seen by the second")
        with SyncRequester(second.requester_url) as r:
            assert r.call("echo", message="x") == "Echo: x"
        if stop_signal == signal.SIGTERM:  # a child that dies is started again
            was = second.get("/healthz")["process"]
            os.kill(told[1]["pid"], signal.SIGKILL)

            def back() -> bool:
                try:
                    return second.get("/healthz")["process"] != was
                except OSError:
                    return False

            wait_for(back, 60, "the second process started again")
            assert "starting it again" in log_path.read_text(errors="replace")
    finally:
        if worker:
            worker.stop(signal.SIGKILL)
        parent.send_signal(stop_signal)
        assert parent.wait(30) == 0, log_path.read_text(errors="replace")
    text = log_path.read_text(errors="replace")
    assert "Traceback" not in text and text.count("broker stopped") == 2, text


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_runbroker_processes_stop_at_once_when_one_cannot_listen(tmp_path: Path,
                                                                redis_url: str) -> None:
    import socket

    step = 7
    ports = free_port_rows(3, step, 2)
    env = {**os.environ, "REDIS_URL": redis_url,
           "BROKER_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    with socket.socket() as taken:  # the second process's HTTP port
        taken.bind(("127.0.0.1", ports[2] + step))
        taken.listen()
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "manage.py", "runbroker", "--processes", "2", "--port-step",
             str(step), "--worker-port", str(ports[0]), "--requester-port", str(ports[1]),
             "--http-port", str(ports[2]), "--ports-file", str(tmp_path / "ports.json")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled(60))
    took = time.monotonic() - started
    assert out.returncode == 1, out
    assert f"127.0.0.1:{ports[2] + step}" in out.stderr and "before it listened" in \
        out.stderr, out.stderr
    assert not (tmp_path / "ports.json").exists() and took < scaled(30), took


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    named = os.environ.get("DATABASE_URL", "")
    admin = (named if named.startswith(("postgres://", "postgresql://"))
             else "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL required but unreachable at {admin}: {exc}")
        pytest.skip(f"NO POSTGRESQL at {admin} ({exc}); set DATABASE_URL to a PostgreSQL server")
    name = f"broker_test_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_history_from_every_process_lands_in_postgres(cluster, workers_started,
                                                      postgres_url: str) -> None:
    import psycopg

    a, b = cluster(2, env={"DATABASE_URL": postgres_url})
    start_worker(workers_started, a, "pg-worker")
    with SyncRequester(a.requester_url) as ra, SyncRequester(b.requester_url) as rb:
        for i in range(10):
            assert (ra if i % 2 else rb).call("echo", message=i) == f"Echo: {i}"
    processes = {a.get("/healthz")["process"], b.get("/healthz")["process"]}

    def rows() -> list[tuple[str, int]]:
        with psycopg.connect(postgres_url) as conn:
            return conn.execute("select process, count(*) from dispatch_requestrecord "
                                "group by process").fetchall()

    wait_for(lambda: sum(n for _, n in rows()) == 10, 15, "10 history rows in PostgreSQL")
    assert {p for p, _ in rows()} == processes and all(n == 5 for _, n in rows())
    with psycopg.connect(postgres_url) as conn:
        sessions = conn.execute("select name, process from dispatch_workersession").fetchall()
    assert sessions == [("pg-worker", a.get("/healthz")["process"])]


@pytest.mark.heavy  # (8 s: in CI and with --heavy)
async def test_redis_stopped_5s_under_load(cluster, workers_started, redis_server,
                                           record_property) -> None:
    """Requests keep coming while Redis is down for 5 s: each gets an answer, no process
    dies, and the cluster serves again by itself."""
    a, b = cluster(2, url=redis_server.url)
    start_worker(workers_started, a, "steady")
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load(r: Requester) -> None:
        while not stop.is_set():
            try:
                answer = await asyncio.wait_for(r.request("echo", {"message": "x"}, timeout=2),
                                                10)
                outcomes["ok" if answer.success else "error"] += 1
            except asyncio.TimeoutError:
                outcomes["silent"] += 1
            await asyncio.sleep(0.01)

    async with Requester(a.requester_url) as ra, Requester(b.requester_url) as rb:
        tasks = [asyncio.ensure_future(load(r)) for r in (ra, rb, ra, rb)]
        await asyncio.sleep(1)
        redis_server.stop()
        await asyncio.sleep(5)
        redis_server.start()
        restarted = time.monotonic()
        before = outcomes["ok"]
        while outcomes["ok"] < before + 20:
            assert time.monotonic() - restarted < 30, f"no recovery: {outcomes}"
            await asyncio.sleep(0.2)
        recovered = time.monotonic() - restarted
        stop.set()
        await asyncio.gather(*tasks)
    assert outcomes["silent"] == 0 and outcomes["error"] > 0, outcomes
    for broker in (a, b):
        assert broker.proc is not None and broker.proc.poll() is None
    record_property("redis_outage", json.dumps({**outcomes, "recovered_s": round(recovered, 1)}))
    logging.getLogger("tests.cluster").warning("figures: %s recovered in %.1fs", dict(outcomes),
                                               recovered)


def session_rows(broker: Broker) -> list[tuple[str, str, str]]:
    """(name, process, status) of every worker registration row in the brokers' database."""
    import sqlite3

    with sqlite3.connect(broker.workdir / "broker.sqlite3") as db:
        return db.execute("SELECT name, process, status FROM dispatch_workersession "
                          "ORDER BY connected_at").fetchall()


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_killed_process_leaves_nothing_online(cluster, workers_started, redis_url,
                                               record_property) -> None:
    """Its workers' rows go offline, and its inbox leaves the broadcast group, soon."""
    import redis

    a, b = cluster(2)
    start_worker(workers_started, a, "on-a")
    start_worker(workers_started, b, "on-b")
    process_a = a.get("/healthz")["process"]
    wait_for(lambda: ("on-a", process_a, "online") in session_rows(a), 10, "a's row written")
    prefix = b.env["BROKER_REDIS_PREFIX"]
    group = f"{prefix}:asgi:group:dispatch.inboxes"
    with redis.Redis.from_url(redis_url) as client:
        assert client.zcard(group) == 2
        a.stop(signal.SIGKILL)
        started = time.monotonic()
        # FAST_ENV: heartbeat 0.5 s, 3 misses: a process is dead 2 s after its last word.
        wait_for(lambda: ("on-a", process_a, "offline") in session_rows(b), 20,
                 f"a's row offline\n{b.log()}")
        offline_after = time.monotonic() - started

        def group_members_alive() -> int:
            cutoff = time.time() - 5  # group_expiry at this heartbeat interval
            return sum(1 for _, score in client.zrange(group, 0, -1, withscores=True)
                       if score >= cutoff)

        wait_for(lambda: group_members_alive() == 1, 20, "a's inbox to expire from the group")
        expired_after = time.monotonic() - started
    assert ("on-b", b.get("/healthz")["process"], "online") in session_rows(b)
    record_property("row_offline_after_s", round(offline_after, 1))
    record_property("inbox_expired_after_s", round(expired_after, 1))
    assert offline_after < 15


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_an_embedded_broker_tidies_the_rows_its_killed_predecessor_left(broker_factory,
                                                                       spawn_worker) -> None:
    first = broker_factory()
    spawn_worker("orphan", target=first)
    process = first.get("/healthz")["process"]
    wait_for(lambda: ("orphan", process, "online") in session_rows(first), 10, "the row")
    first.stop(signal.SIGKILL)
    second = broker_factory()  # same database
    assert ("orphan", process, "offline") in session_rows(second)


@pytest.mark.heavy  # (18 s: in CI and with --heavy)
async def test_a_rolling_restart_under_load_fails_nothing_and_runs_nothing_twice(
        cluster, workers_started, postgres_url: str, tmp_path: Path, record_property) -> None:
    """Two processes over Redis and PostgreSQL, two workers that know both; four clients
    keep jobs of 0.5-2 s in flight while each process in turn is stopped (SIGTERM) and
    started again: every job is answered successfully, and each ran once."""
    a, b = cluster(2, env={"DATABASE_URL": postgres_url})
    for name, home, other in (("w-a", a, b), ("w-b", b, a)):
        start_worker(workers_started, home, name, "--url", other.worker_url,
                     "--max-concurrency", "8")
    log = tmp_path / "runs.txt"
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load(broker: Broker, n: int) -> None:
        async with Requester(broker.requester_url, reconnect_for=60) as client:
            i = 0
            while not stop.is_set():
                i += 1
                tag = f"{n}-{i}"
                try:
                    done = await client.call("job", seconds=0.5 + (i % 4) / 2, tag=tag,
                                             runs=str(log), timeout=60)
                    outcomes["ok" if done == f"done {tag}" else "wrong"] += 1
                except Exception as exc:  # noqa: BLE001 - counted, shown below
                    outcomes[f"{type(exc).__name__}: {exc}"[:120]] += 1

    clients = [asyncio.ensure_future(load(broker, n)) for n, broker in enumerate((a, b, a, b))]
    await asyncio.sleep(3)
    for broker in (a, b):
        broker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert await asyncio.to_thread(broker.proc.wait, 15) == 0  # type: ignore[union-attr]
        await asyncio.to_thread(broker.start)
        await asyncio.sleep(4)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 90)
    starts = Counter(line.split()[1] for line in log.read_text().splitlines()
                     if line.startswith("start"))
    twice = {tag: n for tag, n in starts.items() if n > 1}
    report = {"jobs": sum(outcomes.values()), "ok": outcomes["ok"], "run_twice": len(twice)}
    record_property("rolling_restart", json.dumps(report))
    assert set(outcomes) == {"ok"} and outcomes["ok"] > 20, outcomes
    assert not twice, twice


@pytest.mark.heavy  # (8 s: in CI and with --heavy)
async def test_kill_9_of_the_requesters_process_loses_no_answer_of_a_worker_elsewhere(
        cluster, workers_started, postgres_url: str, tmp_path: Path) -> None:
    """The worker is held by process B, the requester by A; A is killed (kill -9) while
    the jobs run and comes back. The answers the worker gave meanwhile went to A's
    inbox, and died with it (they were answered worker_lost, or never): B keeps them
    for whoever takes A's requests over. Each job is answered once, and ran once."""
    a, b = cluster(2, env={"DATABASE_URL": postgres_url, "BROKER_HEARTBEAT_INTERVAL": "0.5"})
    start_worker(workers_started, b, "w-b", "--max-concurrency", "8")
    log = tmp_path / "runs.txt"
    async with Requester(a.requester_url, reconnect_for=60) as client:
        jobs = [await client.start("job_once", {"seconds": 1.5, "tag": f"J{i}",
                                                "runs": str(log)}, timeout=60)
                for i in range(4)]
        await asyncio.to_thread(wait_for, lambda: log.exists() and log.read_text().count(
            "start") == 4, 10, "the jobs to start")
        await asyncio.to_thread(a.stop, signal.SIGKILL)
        await asyncio.sleep(2.5)  # they finish while A is gone
        await asyncio.to_thread(a.start)
        results = await asyncio.wait_for(asyncio.gather(*(job.result() for job in jobs)), 60)
    assert results == [f"done J{i}" for i in range(4)]
    starts = Counter(line.split()[1] for line in log.read_text().splitlines()
                     if line.startswith("start"))
    assert starts == {f"J{i}": 1 for i in range(4)}, starts


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_while_a_process_stops_its_fleet_is_waited_for_not_failed(
        cluster, workers_started, postgres_url: str) -> None:
    """The only worker is on A; A is stopped (SIGTERM) and its worker moves to B. A
    request that reaches B in between waits for it rather than failing no_workers
    (2 of ~300 in a rolling restart did)."""
    # One worker a second: it is told to come back within a second (a wide window).
    a, b = cluster(2, env={"DATABASE_URL": postgres_url, "BROKER_RECONNECT_RATE": "1"})
    start_worker(workers_started, a, "mover", "--url", b.worker_url)
    outcomes: Counter[str] = Counter()
    async with Requester(b.requester_url) as client:
        assert await client.call("echo", message="warm") == "Echo: warm"
        a.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        stop_at = asyncio.get_running_loop().time() + 4
        while asyncio.get_running_loop().time() < stop_at:
            try:
                await client.call("echo", message="x", timeout=20)
                outcomes["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - counted
                outcomes[type(exc).__name__] += 1
            await asyncio.sleep(0.005)
    assert set(outcomes) == {"ok"}, outcomes

