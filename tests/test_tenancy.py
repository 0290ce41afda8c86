"""Tenancy against a real daphne broker: one tenant's tokens cannot reach, pose as or
out-weigh another's workers.

The attack of issue 24: B's worker token (limited to ``echo``) registered with A's
labels, A's worker's name, weight 1e300 and concurrency 1,000, and got every request of
A's key, selectors and affinity keys included. With pools, A's key is served by A's
pool only, and a worker token carries the pools, labels, version and highest weight
its credential gives it, whatever the worker claims.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.procs import Broker, wait_for
from tests.test_trust import FAST_AUTH, register
from workers.protocol import Message, Registration
from workers.requester import Requester, Route

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_tenants_requests_never_reach_another_tenants_worker(broker_factory,
                                                               spawn_worker) -> None:
    broker = broker_factory(env=FAST_AUTH)
    a_fleet, b_fleet, a_app, b_app, open_key, admin = broker.tokens(
        ["create", "worker", "a-fleet", "--pool", "a"],
        ["create", "worker", "b-fleet", "--pool", "b", "--commands", "echo",
         "--max-weight", "5"],
        ["create", "requester", "a-app", "--pool", "a"],
        ["create", "requester", "b-app", "--pool", "b"],
        ["create", "requester", "operator"],  # no pool: reaches every worker
        ["create", "admin", "ops"])
    broker.wait_credentials(admin)
    spawn_worker("a-gpu", "--token", a_fleet, "--label", "gpu=a100", wait=False, target=broker)
    victim = wait_for(lambda: broker.workers_as(admin), 15, "A's worker to register")[0]

    async def scenario() -> None:
        # B's worker claims A's pool outright: refused.
        ws, answer = await register(broker, b_fleet, Registration(
            "b-claims-a", "a-gpu", ["echo"], labels={"@pool:a": "1"}))
        assert answer.type == "error" and "given by the broker" in answer.data["error"]
        await ws.close()
        # B's worker poses as A's: A's name and labels, every weight and slot it can ask.
        impostor, answer = await register(broker, b_fleet, Registration(
            "b-impostor", "a-gpu", ["echo"], weight=1e300, max_concurrency=1000,
            labels={"gpu": "a100"}))
        assert answer.type == "connect" and answer.data["weight"] == 5.0
        served = {}
        async with Requester(broker.requester_url, token=a_app) as a:
            for i in range(30):
                for how, route in (("select", Route(select={"gpu": "a100"})), ("plain", None),
                                   ("affinity", Route(affinity="user-42"))):
                    response = await a.request("echo", {"message": f"{how} {i}"}, route=route)
                    assert response.success, response
                    served[response.processed_by] = served.get(response.processed_by, 0) + 1
        assert served == {victim["worker_id"]: 90}  # the impostor saw none of A's data
        seen = []  # not even one request (the broker's pings to a silent worker, maybe)
        with pytest.raises(asyncio.TimeoutError):
            while True:
                seen.append(Message.from_json(await asyncio.wait_for(impostor.recv(), 0.3)))
                assert seen[-1].type == "heartbeat", seen[-1]
        # B's key is served by B's workers only: A's get_time is not there for it.
        async with Requester(broker.requester_url, token=b_app) as b:
            refused = await b.request("get_time", {})
            assert not refused.success and refused.code == "no_workers", refused
            pending = asyncio.ensure_future(b.request("echo", {"message": "for b"}))
            frame = Message.from_json(await asyncio.wait_for(impostor.recv(), 5))
            assert frame.data["params"] == {"message": "for b"}  # B's own worker serves B
            await impostor.send(Message.response(frame.msg_id, True, "b's answer").to_json())
            assert (await pending).data == "b's answer"
        # A key without a pool (the operator's, or a single team's) reaches both.
        async with Requester(broker.requester_url, token=open_key) as anyone:
            assert (await anyone.request("get_time", {})).success
        await impostor.close()

    asyncio.run(scenario())
    listed = {w["worker_id"]: w for w in broker.workers_as(admin)}
    assert listed[victim["worker_id"]]["labels"] == {"gpu": "a100", "@pool:a": "1"}


def test_a_worker_token_pins_labels_version_and_weight(broker_factory) -> None:
    broker = broker_factory(env=FAST_AUTH)
    pinned, admin = broker.tokens(
        ["create", "worker", "t4-fleet", "--label", "gpu=t4", "--version", "v1",
         "--max-weight", "2"], ["create", "admin", "ops"])
    broker.wait_credentials(admin)

    async def scenario() -> None:
        for claim, refusal in (({"labels": {"gpu": "a100"}}, "label 'gpu' is 't4'"),
                               ({"version": "v2-canary"}, "version is 'v1'")):
            ws, answer = await register(broker, pinned, Registration("w", "w", ["echo"],
                                                                     **claim))
            assert answer.type == "error" and refusal in answer.data["error"], answer
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 4002
        ws, answer = await register(broker, pinned, Registration(
            "w", "w", ["echo"], weight=50, labels={"region": "eu"}))
        assert answer.type == "connect" and answer.data["weight"] == 2.0
        [listed] = broker.workers_as(admin)
        assert listed["labels"] == {"gpu": "t4", "region": "eu"}
        assert listed["version"] == "v1"
        await ws.close()

    asyncio.run(scenario())


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_changed_credential_sends_its_workers_back_to_take_the_new_rights(
        broker_factory, spawn_worker) -> None:
    """Moving a token to another pool must not leave its live workers serving the old."""
    broker = broker_factory(env=FAST_AUTH)
    fleet, a_app, admin = broker.tokens(
        ["create", "worker", "fleet", "--pool", "a"],
        ["create", "requester", "a-app", "--pool", "a"], ["create", "admin", "ops"])
    broker.wait_credentials(admin)
    spawn_worker("w", "--token", fleet, wait=False, target=broker)
    wait_for(lambda: broker.workers_as(admin), 15, "the worker to register")
    moved = broker.manage("shell", "-c", "from dispatch.models import Credential; "
                          "Credential.objects.filter(name='fleet').update(pools=['b'])")
    assert moved.returncode == 0, moved.stderr
    wait_for(lambda: [w["labels"] for w in broker.workers_as(admin)] == [{"@pool:b": "1"}],
             20, "the worker to come back in pool b")

    async def scenario() -> None:
        async with Requester(broker.requester_url, token=a_app) as a:
            response = await a.request("echo", {"message": "x"})
            assert response.code == "no_workers", response

    asyncio.run(scenario())
    assert json.dumps(broker.workers_as(admin))  # still listed, once


# --------------------------------------------------------------------------- sharing


def slow_frame(request_id: str, seconds: float, **extra: object) -> str:
    return json.dumps({"request_id": request_id, "command": "slow", "accepted": True,
                       "data": {"seconds": seconds, **extra}}, separators=(",", ":"))


def two_keys_one_slot(broker_factory: Any, spawn_worker: Any, env: dict[str, str]
                      ) -> tuple[Broker, str, str]:
    """A broker (with ``env``) whose one worker has one slot, and two requester keys:
    A's and B's."""
    broker = broker_factory(env={**FAST_AUTH, **env})
    fleet, a_app, b_app, admin = broker.tokens(
        ["create", "worker", "fleet"], ["create", "requester", "a-app"],
        ["create", "requester", "b-app"], ["create", "admin", "ops"])
    broker.wait_credentials(admin)
    spawn_worker("one-slot", "--token", fleet, "--handlers", "tests.sample_handlers",
                 "--max-concurrency", "1", wait=False, target=broker)
    wait_for(lambda: broker.workers_as(admin), 15, "the worker to register")
    return broker, a_app, b_app


def as_key(broker: Broker, key: str) -> Any:
    """A requester connection (websockets' sync client) made with ``key``."""
    from websockets.sync.client import connect

    return connect(broker.requester_url, additional_headers={"Authorization": f"Bearer {key}"})


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_tenant_that_fills_the_queue_and_leaves_does_not_keep_another_out(
        broker_factory, spawn_worker) -> None:
    """B queues more than the queue holds and leaves: A was refused all_busy at once."""
    broker, a_app, b_app = two_keys_one_slot(broker_factory, spawn_worker,
                                             {"BROKER_QUEUE_LIMIT": "20"})
    with as_key(broker, b_app) as b:
        b.send(slow_frame("b-first", 1.0))
        for i in range(30):
            b.send(slow_frame(f"b-{i}", 0.05))
        codes = [json.loads(b.recv(timeout=10)).get("code") for _ in range(31)]
    assert codes.count("all_busy") == 10  # 20 queued, then the queue was full
    started = time.monotonic()
    with as_key(broker, a_app) as a:
        a.send(json.dumps({"request_id": "a-1", "command": "echo",
                           "data": {"message": "mine"}}))
        answer = json.loads(a.recv(timeout=15))
    assert answer["success"] and answer["data"] == "Echo: mine", answer
    assert time.monotonic() - started < 10


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_credentials_limits_hold_across_its_reconnects(broker_factory, spawn_worker) -> None:
    """Requests outlive their connection: connect, fill, close, again, used to leave
    any number pending for one key (160 of 1 MB in 20 rounds)."""
    broker, a_app, b_app = two_keys_one_slot(broker_factory, spawn_worker,
                                             {"BROKER_MAX_PENDING": "6"})
    outcomes = []
    for round_ in range(3):
        with as_key(broker, b_app) as b:
            for i in range(4):
                b.send(slow_frame(f"b-{round_}-{i}", 20))
            for _ in range(4):  # accepted, or refused: then it leaves
                frame = json.loads(b.recv(timeout=10))
                outcomes.append(frame.get("event") or frame.get("code"))
    assert outcomes.count("accepted") == 6 and outcomes.count("limit_exceeded") == 6, outcomes
    with as_key(broker, b_app) as b:  # one sent again: the same job
        b.send(slow_frame("b-0-0", 20))
        assert json.loads(b.recv(timeout=10)).get("event") == "accepted"
    with as_key(broker, a_app) as a:  # another key is not held back
        a.send(json.dumps({"request_id": "a-1", "command": "get_time", "accepted": True}))
        assert json.loads(a.recv(timeout=10)).get("event") == "accepted"


def test_what_a_request_costs_parsed_is_what_is_counted(broker_factory, spawn_worker,
                                                        record_property) -> None:
    """1 MB of ``{},`` is ~24 MB parsed: counted as text, 8 MB sent added 177 MB."""
    from tests.test_trust import PeakRss, report

    broker = broker_factory(env={"BROKER_MAX_PENDING_BYTES": str(64 * 2**20)})
    spawn_worker("one-slot", "--handlers", "tests.sample_handlers", "--max-concurrency", "1",
                 target=broker)
    blob = [{}] * 330_000  # 990 KB of JSON text
    from websockets.sync.client import connect

    rss = PeakRss(broker.proc.pid)
    codes = []
    with connect(broker.requester_url, max_size=None) as occupier:
        occupier.send(slow_frame("busy", 30))
        assert json.loads(occupier.recv(timeout=10))["event"] == "accepted"
        for round_ in range(6):  # connect, fill, leave
            with connect(broker.requester_url) as c:
                for i in range(3):
                    c.send(slow_frame(f"{round_}-{i}", 30, blob=blob))
                codes += [json.loads(c.recv(timeout=20)).get("code") or "queued"
                          for _ in range(3)]
    grew = rss.stop()
    report(record_property, dense_frames=len(codes), queued=codes.count("queued"),
           rss_growth_mb=round(grew))
    assert codes.count("queued") == 3, codes  # ~22 MB each as counted; 64 MiB for the key
    assert set(codes) == {"queued", "limit_exceeded"}, codes
    assert grew < 150, grew  # 18 frames would have held ~430 MB


def test_a_queued_request_waits_at_most_queue_max_wait(broker_factory, spawn_worker) -> None:
    """Queued requests used to wait as long as their timeout: a day, if they asked."""
    broker = broker_factory(env={"BROKER_QUEUE_MAX_WAIT": "1"})
    spawn_worker("one-slot", "--handlers", "tests.sample_handlers", "--max-concurrency", "1",
                 target=broker)
    from websockets.sync.client import connect

    with connect(broker.requester_url) as c:
        c.send(slow_frame("busy", 5))
        c.send(json.dumps({"request_id": "queued", "command": "slow", "timeout": 86400}))
        started = time.monotonic()
        frames = [json.loads(c.recv(timeout=10)) for _ in range(2)]
        waited = time.monotonic() - started
    answer = next(f for f in frames if f.get("request_id") == "queued" and "success" in f)
    assert answer["code"] == "all_busy" and "waited 1 s" in answer["error"], answer
    assert 0.9 < waited < 4, waited


def test_requests_refused_at_once_do_not_fill_the_disk(broker_factory) -> None:
    """A tenant's requests answered at once (no worker of its pool offers them) were
    each kept as a done job with its whole body: 2.4 GB of SQLite in 20 s."""
    from websockets.sync.client import connect

    broker = broker_factory()
    files = [broker.db_path, broker.db_path.with_name(broker.db_path.name + "-wal")]

    def on_disk() -> int:
        return sum(f.stat().st_size for f in files if f.exists())

    before = on_disk()
    with connect(broker.requester_url, max_size=None) as c:
        for i in range(40):
            c.send(json.dumps({"request_id": f"r{i}", "command": "nobody-offers-this",
                               "data": {"pad": "x" * 500_000}}))
        codes = {json.loads(c.recv(timeout=10))["code"] for _ in range(40)}
        c.send(json.dumps({"request_id": "r0", "command": "nobody-offers-this"}))
        kept = json.loads(c.recv(timeout=10))  # sent again: its kept answer, not a new run
    time.sleep(0.5)  # the job store commits every few ms
    grew_mb = (on_disk() - before) / 2**20
    assert codes == {"no_workers"} and kept["code"] == "no_workers"
    assert grew_mb < 4, grew_mb  # 40 bodies of 500 KB are 19 MB


@pytest.mark.heavy  # (16 s: in CI and with --heavy)
def test_one_connection_pipelining_cheap_requests_does_not_hold_the_loop(
        broker_factory, spawn_worker, record_property) -> None:
    """A thousand requests in flight on one connection, each refused at once (no worker
    offers them): their frames were handled back to back, and another tenant's p50
    went from 2.5 to 287 ms."""
    import itertools

    import websockets

    from tests.test_trust import report

    broker = broker_factory()
    spawn_worker("w", target=broker)

    async def flood(seconds: float) -> int:
        async with websockets.connect(broker.requester_url, max_size=None) as ws:
            room, sent, ids = asyncio.Semaphore(1000), 0, itertools.count()

            async def read() -> None:
                async for _ in ws:
                    room.release()

            reader = asyncio.ensure_future(read())
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await room.acquire()
                await ws.send(json.dumps({"request_id": f"f{next(ids)}", "command": "nobody"}))
                sent += 1
            reader.cancel()
            return sent

    async def probe(seconds: float) -> list[float]:
        took = []
        async with websockets.connect(broker.requester_url) as ws:
            end = time.monotonic() + seconds
            for i in itertools.count():
                if time.monotonic() > end:
                    return sorted(took)
                started = time.perf_counter()
                await ws.send(json.dumps({"request_id": f"p{i}", "command": "echo",
                                          "data": {"message": "x"}}))
                assert json.loads(await ws.recv())["success"]
                took.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.02)
        return took

    async def scenario() -> tuple[list[float], list[float], int]:
        before = await probe(1)
        flooding = asyncio.ensure_future(flood(4))
        await asyncio.sleep(0.5)
        during = await probe(3)
        return before, during, await flooding

    before, during, sent = asyncio.run(scenario())
    report(record_property, flood_per_s=sent // 4, p50_before_ms=round(before[len(before) // 2], 1),
           p50_during_ms=round(during[len(during) // 2], 1))
    assert during[len(during) // 2] < 60, during  # 11-16 ms; was 176-287 ms
