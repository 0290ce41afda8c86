"""Jobs outlive the broker: real runbroker stopped with SIGTERM and with kill -9, real
worker processes, requesters over plain websockets speaking the seed's JSON."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.procs import Broker, WorkerProc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HANDLERS = ("--handlers", "tests.sample_handlers")


def send(ws: ClientConnection, command: str, request_id: str, **data: Any) -> None:
    ws.send(json.dumps({"request_id": request_id, "command": command, "data": data,
                        "accepted": True, "timeout": 60}))


def frames_until(ws: ClientConnection, done: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 30.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        got.append(json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
    return got


def accepted(ids: list[str]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: {f["request_id"] for f in got if f.get("event") == "accepted"} >= set(ids)


def answers(ids: list[str]) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: {f["request_id"] for f in got if "success" in f} >= set(ids)


def runs(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def attach_all(broker: Broker, ids: list[str]) -> dict[str, dict[str, Any]]:
    """What a requester that comes back after the restart gets for each id."""
    with connect(broker.requester_url) as ws:
        for rid in ids:
            ws.send(json.dumps({"attach": rid}))
        got = frames_until(ws, answers(ids), timeout=60)
    return {f["request_id"]: f for f in got if "success" in f}


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_accepted_jobs_survive_a_broker_restart(broker: Broker, spawn_worker: Callable[
        ..., WorkerProc], tmp_path: Path, how: signal.Signals) -> None:
    """One worker, one slot: a long job A runs, B and C wait behind it. The broker goes
    (kill -9: a crash; SIGTERM: a deploy) and comes back; the requester comes back and
    attaches: all three are answered, and A ran once, to its end."""
    spawn_worker("w1", *HANDLERS, "--max-concurrency", "1")
    log = tmp_path / "runs.txt"
    ids = [f"{tag}-{uuid.uuid4().hex[:6]}" for tag in "ABC"]
    with connect(broker.requester_url) as ws:
        for rid, seconds in zip(ids, (4.0, 0.5, 0.5)):
            send(ws, "job", rid, seconds=seconds, tag=rid[0], runs=str(log))
        frames_until(ws, accepted(ids))
        wait_for(lambda: runs(log) == ["start A"], 10, "A to start")
        broker.stop(how)
    assert broker.proc is not None and broker.proc.returncode in (0, -signal.SIGKILL)
    broker.start()
    got = attach_all(broker, ids)
    assert all(got[rid]["success"] for rid in ids), got
    assert [got[rid]["data"] for rid in ids] == ["done A", "done B", "done C"]
    assert runs(log).count("start A") == 1, runs(log)  # adopted, not run again
    assert sorted(runs(log)) == sorted(["start A", "end A", "start B", "end B", "start C",
                                        "end C"]), runs(log)


def test_a_request_sent_again_is_the_same_job(broker: Broker, spawn_worker: Callable[
        ..., WorkerProc], tmp_path: Path) -> None:
    """A requester that does not know whether its request arrived sends it again, on a
    new connection: it gets the one job's answer, and the job ran once."""
    spawn_worker("w1", *HANDLERS)
    log = tmp_path / "runs.txt"
    rid = f"again-{uuid.uuid4().hex[:6]}"
    with connect(broker.requester_url) as ws:
        send(ws, "job", rid, seconds=1.0, tag="X", runs=str(log))
        frames_until(ws, accepted([rid]))
    with connect(broker.requester_url) as ws:  # while it runs
        send(ws, "job", rid, seconds=1.0, tag="X", runs=str(log))
        [answer] = [f for f in frames_until(ws, answers([rid])) if "success" in f]
    assert answer["success"] and answer["data"] == "done X"
    with connect(broker.requester_url) as ws:  # after its answer
        send(ws, "job", rid, seconds=1.0, tag="X", runs=str(log))
        [again] = [f for f in frames_until(ws, answers([rid])) if "success" in f]
    assert again == answer and runs(log) == ["start X", "end X"]


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_the_python_client_rides_out_a_restart(broker: Broker, spawn_worker: Callable[
        ..., WorkerProc], tmp_path: Path) -> None:
    """start() returns once the job is stored; the broker is killed and comes back; the
    client reconnects by itself, and every call and Job gets its answer, each run once."""
    import asyncio

    from workers.requester import Requester

    spawn_worker("w1", *HANDLERS, "--max-concurrency", "2")
    log = tmp_path / "runs.txt"
    async with Requester(broker.requester_url, reconnect_for=60) as client:
        jobs = [await client.start("job", {"seconds": 3.0, "tag": tag, "runs": str(log)})
                for tag in ("J1", "J2")]
        call = asyncio.ensure_future(client.call("job", seconds=3.0, tag="C", runs=str(log),
                                                 timeout=60))
        await asyncio.to_thread(wait_for, lambda: len(runs(log)) >= 2, 10, "jobs to start")
        await asyncio.to_thread(broker.stop, signal.SIGKILL)
        await asyncio.to_thread(broker.start)
        results = [await job.result() for job in jobs] + [await call]
    assert results == ["done J1", "done J2", "done C"]
    assert all(runs(log).count(f"start {tag}") == 1 for tag in ("J1", "J2", "C")), runs(log)


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_a_job_that_must_not_run_twice_is_sent_only_once_it_is_kept(
        broker_factory, spawn_worker: Callable[..., WorkerProc], tmp_path: Path) -> None:
    """kill -9 before the store committed a request (commits 1 s apart here). A command
    that must not run twice was not yet sent to its worker, so the client sending it
    again after the restart runs it once; it was sent at once, and ran twice."""
    import asyncio

    from workers.requester import Requester

    broker = broker_factory(env={"BROKER_STORE_COMMIT_SECONDS": "1.0"})
    spawn_worker("w1", *HANDLERS, target=broker)
    log = tmp_path / "runs.txt"
    async with Requester(broker.requester_url, reconnect_for=60) as client:
        call = asyncio.ensure_future(client.call("job_once", seconds=0.5, tag="O",
                                                 runs=str(log), timeout=60))
        await asyncio.sleep(0.3)  # arrived, not committed yet
        await asyncio.to_thread(broker.stop, signal.SIGKILL)
        await asyncio.to_thread(broker.start)
        assert await call == "done O"
    await asyncio.sleep(1.0)  # a second run would have started and ended by now
    assert runs(log) == ["start O", "end O"], runs(log)
