"""Faults, with nothing lost: each scenario runs real processes and reports its figures.

The figures are attached to the test report (``record_property``) and logged, so
``./test.sh tests/test_faults.py -o log_cli=true`` shows them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import statistics
import time
from collections import Counter

import psutil
import pytest
import websockets

from tests.procs import Broker, until, wait_for
from workers.protocol import Message, Registration
from workers.requester import Requester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
log = logging.getLogger("tests.faults")

HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.fixture
def broker(shared_broker: Broker) -> Broker:
    """The tests here that ask for ``broker`` share one (``shared_broker``: they read
    only their own workers' state); those that stop or configure a broker make their
    own with ``broker_factory``."""
    return shared_broker


def report(record_property, **figures: object) -> None:
    for name, value in figures.items():
        record_property(name, value)
    log.warning("figures: %s", json.dumps(figures))


async def test_kill_9_worker_with_100_requests_in_flight(broker: Broker, spawn_worker,
                                                         record_property) -> None:
    victim = spawn_worker("victim", *HANDLERS, "--max-concurrency", "200")
    spawn_worker("survivor", *HANDLERS, "--max-concurrency", "200")
    async with Requester(broker.requester_url) as r:
        calls = [asyncio.ensure_future(r.request("slow", {"seconds": 1.0, "tag": str(i)},
                                                 timeout=20)) for i in range(100)]
        charges = [asyncio.ensure_future(r.request("charge", {"seconds": 1.0}, timeout=20))
                   for _ in range(6)]
        await until(lambda: sum(w["in_flight"] for w in broker.workers()) == 106, 10,
                    "106 requests in flight")
        held = next(w["in_flight"] for w in broker.workers() if w["name"] == "victim")
        victim.stop(signal.SIGKILL)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 20)
        charged = await asyncio.wait_for(asyncio.gather(*charges), 20)
    assert len(answers) == 100 and all(a.success for a in answers), \
        Counter(a.error for a in answers)
    not_retried = [c for c in charged if not c.success]
    assert all("not idempotent" in c.error for c in not_retried)
    assert all(c.processed_by != "victim" for c in charged if c.success)
    report(record_property, in_flight=106, held_by_killed_worker=held, answered=106,
           slow_redispatched_ok=100, charge_not_retried=len(not_retried), silent=0)


async def test_frozen_worker_detected_by_heartbeat(broker: Broker, spawn_worker,
                                                   record_property) -> None:
    frozen = spawn_worker("frozen", *HANDLERS)
    spawn_worker("healthy", *HANDLERS)
    frozen.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        await until(lambda: [w["name"] for w in broker.workers()] == ["healthy"], 10,
                    "the frozen worker to be dropped")
        detected = time.monotonic() - started
        async with Requester(broker.requester_url) as r:
            answers = await asyncio.gather(*(r.request("echo", {"message": i})
                                              for i in range(20)))
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert {a.success for a in answers} == {True}
    assert len({a.processed_by for a in answers}) == 1  # only the healthy one
    assert detected < 3.5  # heartbeat 0.5 s x 3 misses (+ a tick), not the 30 s timeout
    report(record_property, frozen_detection_seconds=round(detected, 2),
           heartbeat_interval=0.5, misses=3)


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_worker_that_stops_reading_is_cut_off(broker_factory, record_property) -> None:
    # One requester sends all 100 MB: let it (its own limit is tested in test_trust.py).
    broker = broker_factory(env={"BROKER_MAX_MESSAGE_BYTES": str(2 ** 20),
                                 "BROKER_MAX_IN_FLIGHT_BYTES": str(200 * 2 ** 20)})
    rss = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
    before = rss.memory_info().rss
    # It never reads, so it would never see the broker's close frame either: do not
    # wait for one when leaving (the close handshake is not what is tested here).
    async with websockets.connect(broker.worker_url, max_queue=1, close_timeout=0.1) as deaf:
        await deaf.send(Message("connect", Registration("deaf", "deaf", ["echo"],
                                                        max_concurrency=1000).to_data()).to_json())
        await deaf.recv()  # the connect answer; from now on it reads nothing

        async def keep_talking() -> None:
            while True:
                await deaf.send(Message.heartbeat().to_json())
                await asyncio.sleep(0.2)

        talker = asyncio.ensure_future(keep_talking())
        payload = "x" * 500_000
        async with Requester(broker.requester_url) as r:
            started = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(
                *(r.request("echo", {"message": payload}, timeout=30) for _ in range(200))), 40)
            cut_off = time.monotonic() - started
        talker.cancel()
    peak = rss.memory_info().rss
    # Lost with the worker, or (sent after it was dropped) no worker left: never a timeout.
    errors = {a.error for a in answers}
    assert not any(a.success for a in answers), errors
    assert all(e.startswith(("Worker lost", "No available workers")) for e in errors), errors
    assert any(e.startswith("Worker lost") for e in errors), errors
    grew_mb = (peak - before) / 2 ** 20
    assert cut_off < 10 and grew_mb < 300, (cut_off, grew_mb)  # ~2 s on a quiet machine
    report(record_property, requests=200, payload_kb=500, cut_off_seconds=round(cut_off, 2),
           broker_rss_growth_mb=round(grew_mb, 1))


async def test_no_worker_error_is_fast(broker: Broker, record_property) -> None:
    async with Requester(broker.requester_url) as r:
        await r.request("echo")  # warm up
        latencies = []
        for _ in range(200):
            started = time.perf_counter()
            answer = await r.request("echo")
            latencies.append((time.perf_counter() - started) * 1000)
            assert answer.error == "No available workers"
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 100
    report(record_property, no_worker_p50_ms=round(statistics.median(latencies), 2),
           no_worker_p99_ms=round(p99, 2))


async def test_without_a_job_store_sigterm_finishes_work_and_exits_0(
        broker_factory, spawn_worker, record_property) -> None:
    broker = broker_factory(env={"BROKER_JOB_STORE": "0"})
    worker = spawn_worker("w1", *HANDLERS, target=broker)
    async with Requester(broker.requester_url) as r:
        calls = [asyncio.ensure_future(r.request("slow", {"seconds": 1.0})) for _ in range(5)]
        await until(lambda: broker.workers()[0]["in_flight"] == 5, 5, "5 in flight")
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        await until(lambda: "stopping: finishing requests in flight" in broker.log(), 5,
                    "the broker to start its graceful stop")
        late = await r.request("echo")
        answers = await asyncio.wait_for(asyncio.gather(*calls), 15)
    code = await asyncio.to_thread(broker.proc.wait, 15)  # type: ignore[union-attr]
    took = time.monotonic() - started
    assert [a.success for a in answers] == [True] * 5
    assert late.error == "Broker shutting down"
    assert code == 0 and took < 5
    wait_for(lambda: "Broker shutting down" in worker.log(), 5, "the worker to be told")
    report(record_property, in_flight_at_sigterm=5, finished=5, exit_code=code,
           shutdown_seconds=round(took, 2))


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_sigterm_hands_over_and_every_call_is_answered_after_the_restart(
        broker: Broker, spawn_worker, tmp_path, record_property) -> None:
    """With the job store (the default), a stopping broker does not wait for work in
    flight nor fail it: it exits at once, its workers go on; once it is back, the
    client, which reconnected by itself, gets every answer, and each job ran once."""
    worker = spawn_worker("w1", *HANDLERS)
    log = tmp_path / "runs.txt"
    async with Requester(broker.requester_url, reconnect_for=60) as r:
        calls = [asyncio.ensure_future(r.call("job", seconds=2.0, tag=str(i), runs=str(log),
                                              timeout=60)) for i in range(5)]
        await until(lambda: log.exists() and log.read_text().count("start") == 5, 5,
                    "5 running")
        started = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = await asyncio.to_thread(broker.proc.wait, 15)  # type: ignore[union-attr]
        took = time.monotonic() - started
        await asyncio.to_thread(broker.start)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert code == 0 and took < 3, (code, took)
    assert answers == [f"done {i}" for i in range(5)]
    assert sorted(log.read_text().split()) == sorted(
        [w for i in range(5) for w in ("start", str(i), "end", str(i))])  # each ran once
    wait_for(lambda: "Broker shutting down" in worker.log(), 5, "the worker to be told")
    report(record_property, in_flight_at_sigterm=5, answered_after_restart=5, exit_code=code,
           shutdown_seconds=round(took, 2))


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_drain_takes_a_worker_out_of_rotation(broker: Broker, spawn_worker) -> None:
    spawn_worker("a")
    spawn_worker("b")
    ids = {w["name"]: w["worker_id"] for w in broker.workers()}
    drained = broker.manage("drain", ids["a"])
    assert drained.returncode == 0 and "draining" in drained.stdout

    async def served_by() -> Counter[str]:
        async with Requester(broker.requester_url) as r:
            return Counter([(await r.request("echo", {"message": i})).processed_by
                            for i in range(20)])

    assert asyncio.run(served_by()) == Counter({ids["b"]: 20})
    undone, unknown = broker.manage_many(["drain", ids["a"], "--undo"], ["drain", "nobody"])
    assert undone.returncode == 0
    assert ids["a"] in asyncio.run(served_by())
    assert unknown.returncode != 0 and "Unknown worker" in unknown.stderr
