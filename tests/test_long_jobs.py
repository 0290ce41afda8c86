"""Long jobs, end to end: a real broker, real worker processes, real clients.

Cancel, progress and chunks (with back-pressure), deadlines told to workers, leases,
re-attach after a lost connection, poison requests, priority and fairness; and a
seed client and an old-protocol worker that see none of it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets

from tests.procs import Broker, WorkerProc, scaled, until, wait_for
from tests.rawws import RawClient
from workers.errors import Cancelled, ConnectionLost, WorkerLost
from workers.protocol import Message, Registration
from workers.requester import Chunk, Progress, Requester, Result

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HANDLERS = ("--handlers", "tests.sample_handlers")


def in_flight(broker: Broker) -> int:
    return sum(w["in_flight"] for w in broker.workers())


def queued(broker: Broker, admin: str) -> int:
    """Requests waiting for a free slot (the health check tells an admin)."""
    import urllib.request

    request = urllib.request.Request(broker.http_url + "/healthz",
                                     headers={"Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)["waiting"]


@pytest.fixture
def broker(shared_broker: Broker) -> Broker:
    """The tests here that ask for ``broker`` share one (``shared_broker``: they read
    only their own worker's state); those that set a broker up their own way make it
    with ``broker_factory``."""
    return shared_broker


@pytest.fixture
def worker(broker: Broker, spawn_worker) -> WorkerProc:
    return spawn_worker("jobs", *HANDLERS, "--max-concurrency", "2")


# --------------------------------------------------------------------------- cancel


async def test_cancelling_a_running_job_stops_it_on_the_worker(broker: Broker,
                                                               worker: WorkerProc) -> None:
    async with Requester(broker.requester_url) as requester:
        job = await requester.start("long_job", {"seconds": 30}, stream=True)
        events = job.events()
        first = await asyncio.wait_for(anext(events), 10)
        assert isinstance(first, Progress) and first.progress is not None
        started = time.monotonic()
        await job.cancel()
        with pytest.raises(Cancelled) as failed:
            async for _ in events:
                pass
        assert failed.value.code == "cancelled" and time.monotonic() - started < 2
    await until(lambda: in_flight(broker) == 0, 5, "the slot back once the worker stopped")
    await until(lambda: "Cancelling request" in worker.log(), 5, "the worker told")


async def test_cancelling_the_awaiting_task_cancels_the_request(broker: Broker,
                                                                worker: WorkerProc) -> None:
    async with Requester(broker.requester_url) as requester:
        call = asyncio.ensure_future(requester.call("long_job", seconds=30))
        await until(lambda: in_flight(broker) == 1, 10, "the job on its worker")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: in_flight(broker) == 0, 5, "the worker to stop it")
        assert await requester.call("echo", message="next") == "Echo: next"


async def test_a_queued_request_cancelled_never_reaches_a_worker(broker: Broker,
                                                                 worker: WorkerProc) -> None:
    async with Requester(broker.requester_url) as requester:
        busy = [await requester.start("long_job", {"seconds": 3}) for _ in range(2)]
        await until(lambda: in_flight(broker) == 2, 10, "both slots taken")
        queued = await requester.start("whoami")
        await until(lambda: broker.get("/healthz")["waiting"] == 1, 10, "it to be queued")
        await queued.cancel()
        with pytest.raises(Cancelled):
            await queued.result()
        for job in busy:
            assert await job.result() == "finished"
    await until(lambda: in_flight(broker) == 0, 5, "both done")
    [listed] = broker.workers()
    assert listed["completed"] + listed["errors"] == 2  # the two jobs, not the cancelled one


def test_a_thread_handler_sees_ctx_cancelled(broker: Broker, worker: WorkerProc,
                                             tmp_path: Path) -> None:
    marker = tmp_path / "seen"

    async def scenario() -> None:
        async with Requester(broker.requester_url) as requester:
            job = await requester.start("careful", {"seconds": 30, "marker": str(marker)})
            await until(lambda: in_flight(broker) == 1, 10, "the job running")
            await job.cancel()
            with pytest.raises(Cancelled):
                await job.result()

    asyncio.run(scenario())
    wait_for(marker.exists, 5, "the handler to see ctx.cancelled")
    assert marker.read_text() == "cancelled: cancelled by the requester"
    wait_for(lambda: in_flight(broker) == 0, 5, "the slot back")


def test_an_operator_cancels_with_the_management_command(broker: Broker,
                                                          worker: WorkerProc) -> None:
    async def scenario() -> None:
        async with Requester(broker.requester_url) as requester:
            job = await requester.start("long_job", {"seconds": 30})
            await until(lambda: in_flight(broker) == 1, 10, "the job running")
            done = await asyncio.to_thread(broker.manage, "cancel", job.request_id)
            assert done.returncode == 0 and "Cancelled 1 request" in done.stdout
            with pytest.raises(Cancelled, match=r"cancelled by a loopback peer \(protected "
                               r"mode\) through the control API"):
                await job.result()
            missing = await asyncio.to_thread(broker.manage, "cancel", "no-such-request")
            assert missing.returncode != 0 and "No request" in missing.stderr

    asyncio.run(scenario())


# --------------------------------------------------------------------------- progress, chunks


async def test_progress_and_chunks_come_in_order_before_the_answer(broker: Broker,
                                                                   worker: WorkerProc) -> None:
    async with Requester(broker.requester_url) as requester:
        events = [e async for e in requester.stream("count", n=20)]
        assert [e.seq for e in events if isinstance(e, Chunk)] == list(range(20))
        assert [e.data["i"] for e in events if isinstance(e, Chunk)] == list(range(20))
        assert isinstance(events[-1], Result) and events[-1].data == [
            {"i": i, "pad": ""} for i in range(20)]
        seen: list[Progress] = []
        assert await requester.call("long_job", seconds=0.5, on_progress=seen.append) == \
            "finished"
        fractions = [p.progress for p in seen]
        assert len(seen) >= 3 and fractions == sorted(fractions), fractions
        # Without asking: no events, and a streaming command's chunks in the answer.
        assert await requester.call("count", n=3) == [{"i": i, "pad": ""} for i in range(3)]


def test_a_seed_client_gets_one_answer_frame_and_nothing_else(broker: Broker,
                                                              worker: WorkerProc) -> None:
    with RawClient(broker.host, broker.requester_port) as client:
        client.send_text(json.dumps({"request_id": "seed", "command": "long_job",
                                     "data": {"seconds": 0.5}}))
        answer = json.loads(client.recv().text)
        assert answer == {"request_id": "seed", "success": True, "data": "finished",
                          "error": None, "processed_by": answer["processed_by"]}
        client.send_text(json.dumps({"request_id": "seed2", "command": "echo",
                                     "data": {"message": "x"}}))
        assert json.loads(client.recv().text)["request_id"] == "seed2"  # nothing between


def stalled(produced: Path, still: float = scaled(1.0), checks: int = 5) -> int | None:
    """The count in ``produced`` once it stays the same for ``still`` seconds (a
    worker held back), else None; a worker that is not held back finishes all of
    them and stalls there."""
    seen = []
    for _ in range(checks + 1):
        seen.append(produced.read_text() if produced.exists() else "")
        if len(set(seen)) > 1 or not seen[-1]:
            return None
        time.sleep(still / checks)
    return int(seen[-1])


def test_a_slow_reader_holds_its_workers_back(broker: Broker, worker: WorkerProc,
                                              tmp_path: Path, record_property) -> None:
    """Back-pressure: neither the worker nor the broker buffers what it does not read."""
    produced = tmp_path / "produced"
    rss = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
    before = rss.memory_info().rss
    with RawClient(broker.host, broker.requester_port, rcvbuf=4096, timeout=30) as client:
        client.send_text(json.dumps({"request_id": "flood", "command": "count", "stream": True,
                                     "data": {"n": 2000, "size": 32_000,
                                              "log": str(produced)}}))
        held_at = wait_for(lambda: stalled(produced), 20, "the worker to stop producing")
        grew_mb = (rss.memory_info().rss - before) / 2**20
        got: list[dict[str, Any]] = []
        while len(got) < 3000 and "success" not in (got[-1] if got else {}):
            frame = client.recv()  # to the answer (the socket stays open after it)
            if frame.opcode == 1:
                got.append(json.loads(frame.text))
    record_property("chunks_produced_while_unread", held_at)
    record_property("broker_rss_growth_mb", round(grew_mb, 1))
    assert held_at < 400, f"the worker produced {held_at} chunks nobody read"
    assert grew_mb < 60, grew_mb
    chunks = [g["seq"] for g in got if g.get("event") == "chunk"]
    assert chunks == list(range(len(chunks))) and len(chunks) == 2000
    assert got[-1]["request_id"] == "flood" and got[-1]["success"] is True


# --------------------------------------------------------------------------- deadlines, leases


async def test_the_worker_knows_the_time_left(broker: Broker, worker: WorkerProc) -> None:
    async with Requester(broker.requester_url) as requester:
        left = await requester.call("time_left", timeout=12)
    assert 10 < left <= 12


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_hung_leased_job_fails_over_then_expires(broker_factory, spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_MAX_RETRIES": "1"})
    for name in ("a", "b"):
        spawn_worker(name, *HANDLERS, target=broker)

    async def scenario() -> None:
        async with Requester(broker.requester_url) as requester:
            started = time.monotonic()
            with pytest.raises(WorkerLost) as failed:
                await requester.call("hangs", timeout=30)
            took = time.monotonic() - started
            assert failed.value.code == "lease_expired" and "after 2 attempts" in \
                failed.value.error
            assert took < 8, took  # two leases of 1 s (checked twice a heartbeat), not 30
            assert await requester.call("beating", seconds=2.5) == "alive"

    asyncio.run(scenario())


# --------------------------------------------------------------------------- re-attach


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_a_new_connection_attaches_to_a_running_or_finished_request(
        broker_factory, spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_AUTH_REFRESH_SECONDS": "0.3"})
    *keys, worker_token, admin = await asyncio.to_thread(
        broker.tokens, ["create", "requester", "mine"], ["create", "requester", "theirs"],
        ["create", "worker", "worker"], ["create", "admin", "admin"])
    await asyncio.to_thread(broker.wait_credentials, admin)
    await asyncio.to_thread(spawn_worker, "w", *HANDLERS, "--token", worker_token, wait=False,
                            target=broker)
    await until(lambda: len(broker.workers_as(admin)) == 1, 15, "the worker")
    async with Requester(broker.requester_url, token=keys[0]) as first:
        running = await first.start("long_job", {"seconds": 2})
        finished = await first.start("echo", {"message": "kept"})
        assert await finished.result() == "Echo: kept"
    # The first connection is gone; the job goes on.

    async def attach(token: str, request_id: str, stream: bool = False) -> list[dict]:
        async with websockets.connect(broker.requester_url,
                                      additional_headers={"Authorization": f"Bearer {token}"}
                                      ) as ws:
            await ws.send(json.dumps({"attach": request_id, "stream": stream}))
            frames = []
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                if "success" in frames[-1]:
                    return frames

    denied = await attach(keys[1], running.request_id)
    assert denied[-1].get("code") == "unknown_request", denied  # another credential sees nothing
    frames = await attach(keys[0], running.request_id, stream=True)
    assert frames[-1]["data"] == "finished"
    assert any(f.get("event") == "progress" for f in frames)  # the rest of its progress
    kept = await attach(keys[0], finished.request_id)
    assert kept == [{"request_id": finished.request_id, "success": True, "data": "Echo: kept",
                     "error": None, "processed_by": kept[0]["processed_by"]}]

    def over_http(token: str) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{broker.http_url}/api/requests/{finished.request_id}",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, None

    status, body = await asyncio.to_thread(over_http, keys[0])
    assert status == 200 and body["state"] == "finished" and body["data"] == "Echo: kept"
    assert (await asyncio.to_thread(over_http, keys[1]))[0] == 404


class DroppingProxy:
    """A TCP relay in front of the broker whose connections the test can cut."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers += [writer, up_writer]

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        self.server = await asyncio.start_server(relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def test_the_client_re_attaches_its_calls_after_a_reconnect(broker: Broker,
                                                                  worker: WorkerProc) -> None:
    proxy = DroppingProxy(broker.requester_port)
    port = await proxy.start()
    async with Requester(f"ws://127.0.0.1:{port}/") as requester:
        calls = [asyncio.ensure_future(requester.call("long_job", seconds=1.5)),
                 asyncio.ensure_future(requester.call("echo", message="quick"))]
        await until(lambda: in_flight(broker) == 1, 10, "the job running")
        proxy.cut()  # both calls lose their connection; the broker keeps them
        assert await asyncio.wait_for(asyncio.gather(*calls), 20) == ["finished",
                                                                       "Echo: quick"]
    async with Requester(f"ws://127.0.0.1:{port}/", reconnect=False) as fragile:
        call = asyncio.ensure_future(fragile.call("long_job", seconds=1.5))
        await until(lambda: in_flight(broker) == 1, 10, "the job running")
        proxy.cut()
        with pytest.raises(ConnectionLost):
            await call
    proxy.server.close()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- poison, fairness


def test_a_poison_request_takes_down_at_most_max_retries_plus_one_workers(
        broker_factory, spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_MAX_RETRIES": "2"})
    victims = [spawn_worker(f"v{i}", *HANDLERS, target=broker) for i in range(4)]

    async def scenario() -> None:
        async with Requester(broker.requester_url) as requester:
            with pytest.raises(WorkerLost, match="after 3 attempts"):
                await requester.call("poison", timeout=30)
            # A worker's socket closes a moment before its process is reaped; and one
            # that is still up serves the next request.
            await until(lambda: dead() >= 3, 10, "three workers gone")
            assert await requester.call("echo", message="after") == "Echo: after"

    def dead() -> int:
        return sum(1 for v in victims if v.proc.poll() is not None)  # type: ignore[union-attr]

    asyncio.run(scenario())
    assert dead() == 3

    def row() -> tuple | None:
        with sqlite3.connect(broker.workdir / "broker.sqlite3") as db:
            return db.execute("SELECT workers_lost, code, attempts FROM "
                              "dispatch_requestrecord WHERE command = 'poison'").fetchone()

    assert wait_for(row, 10, "the history row") == (3, "worker_lost", 3)


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_one_keys_burst_does_not_starve_another_key(broker_factory, spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_AUTH_REFRESH_SECONDS": "0.3"})
    bulk, small, worker_token, admin = broker.tokens(
        ["create", "requester", "bulk"], ["create", "requester", "small"],
        ["create", "worker", "fleet"], ["create", "admin", "ops"])
    tokens = {"bulk": bulk, "small": small}
    broker.wait_credentials(admin)
    spawn_worker("one", *HANDLERS, "--token", worker_token, "--max-concurrency", "1",
                 wait=False, target=broker)
    wait_for(lambda: len(broker.workers_as(admin)) == 1, 15, "the worker")

    async def scenario() -> tuple[int, int]:
        async with Requester(broker.requester_url, token=tokens["bulk"]) as bulk, \
                Requester(broker.requester_url, token=tokens["small"]) as small:
            order: list[str] = []

            async def one(requester: Requester, tag: str, **options: Any) -> None:
                await requester.call("sleep_ms", ms=10, timeout=60, **options)
                order.append(tag)

            burst = [asyncio.ensure_future(one(bulk, f"bulk-{i}")) for i in range(300)]
            # the whole burst has reached the broker: answered, running (1) or queued
            await until(lambda: len(order) + 1 + queued(broker, admin) >= 300, 20,
                        "the burst queued")
            mine = asyncio.ensure_future(one(small, "small"))
            urgent = asyncio.ensure_future(one(bulk, "urgent", priority=9))
            await asyncio.wait_for(asyncio.gather(*burst, mine, urgent), 60)
            return order.index("small") - order.index("bulk-0"), order.index("urgent")

    small_at, urgent_at = asyncio.run(scenario())
    # The burst had a head start of ~0.5 s (about 40 requests at 10 ms); after that the
    # other key waits a few slots, not for the rest of the burst.
    assert small_at < 80, small_at
    assert urgent_at < 80, urgent_at


# --------------------------------------------------------------------------- old protocol


async def test_an_old_protocol_worker_serves_unchanged_and_survives_a_cancel(
        broker: Broker) -> None:
    """A raw-websockets worker written from the seed's protocol: it ignores fields it
    does not know, and answers a frame type it does not know with an error."""
    async with websockets.connect(broker.worker_url) as ws:
        await ws.send(Message("connect", Registration("old", "old", ["echo"]).to_data())
                      .to_json())
        assert json.loads(await ws.recv())["type"] == "connect"

        async def serve() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg["type"] == "request" and msg["data"]["action"] == "echo":
                    await asyncio.sleep(float(msg["data"]["params"].get("wait", 0)))
                    await ws.send(Message.response(
                        msg["msg_id"], True, f"Echo: {msg['data']['params']['message']}"
                    ).to_json())
                elif msg["type"] not in ("heartbeat", "request", "response"):
                    await ws.send(Message.error(f"Unknown message type '{msg['type']}'",
                                                reply_to=msg["msg_id"]).to_json())

        serving = asyncio.ensure_future(serve())
        async with Requester(broker.requester_url) as requester:
            assert await requester.call("echo", message="old") == "Echo: old"
            job = await requester.start("echo", {"message": "slow", "wait": 1.0})
            await until(lambda: in_flight(broker) == 1, 10, "the job on its worker")
            await job.cancel()
            with pytest.raises(Cancelled):
                await job.result()
            await until(lambda: in_flight(broker) == 0, 5, "its slot back when it answered")
            assert await requester.call("echo", message="again") == "Echo: again"
        serving.cancel()


def test_a_worker_that_ignores_the_chunk_window_fails_its_request_not_its_requester(
        broker_factory) -> None:
    """Issue 24: a worker that sends chunks without waiting for their acknowledgement
    was not slowed; its requester, reading slower, was cut off (4009) instead."""
    import json

    from websockets.sync.client import connect

    from tests.rawws import RawClient
    from workers.protocol import Message, Registration

    broker = broker_factory(env={"BROKER_HEARTBEAT_INTERVAL": "10"})  # a raw worker: no beats
    requester = RawClient(broker.host, broker.requester_port, rcvbuf=65536, timeout=10)
    with connect(broker.worker_url) as worker:
        worker.send(Message("connect", Registration("firehose", "firehose",
                                                    ["stream"]).to_data()).to_json())
        assert json.loads(worker.recv(timeout=5))["type"] == "connect"
        requester.send_text(json.dumps({"request_id": "r", "command": "stream",
                                        "stream": True}))
        request = Message.from_json(worker.recv(timeout=5))
        # 16 MB while the requester does not read: past 2 MB unread its acks are held.
        for seq in range(40):
            worker.send(Message.chunk(request.msg_id, seq, "x" * 400_000).to_json())
        frames = []
        while True:  # now it reads: the chunks passed on, then the answer
            frame = json.loads(requester.recv().text)
            frames.append(frame)
            if "success" in frame:
                break
    requester.sock.close()
    assert frame["code"] == "worker_error" and "without waiting" in frame["error"], frame
    assert len(frames) - 1 < 30  # chunks passed on before it failed, of the 40 sent
