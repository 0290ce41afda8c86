"""Routing, end to end: a real broker, real worker processes, real clients.

Balance (decaying latency, in flight, weight), outlier ejection and probing, label
selectors, affinity, canary by version, hedged requests, and every choice explained
(answers, history rows, ``manage.py explain``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections import Counter
from typing import Any, Callable

import pytest
import websockets

from tests.procs import Broker, WorkerProc, until, wait_for
from workers.protocol import ApiResponse
from workers.requester import Requester, Route

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.fixture
def broker(shared_broker: Broker) -> Broker:
    """The tests here that ask for ``broker`` share one (``shared_broker``: what they
    measure is their own workers'); those that configure a broker, or read what it
    learnt about a command (hedging) or wrote (history), make their own."""
    return shared_broker


def fleet(spawn: Callable[..., WorkerProc], *names: str, args: tuple[str, ...] = (),
          env: dict[str, dict[str, str]] | None = None, broker: Broker | None = None
          ) -> list[WorkerProc]:
    """Workers named ``names``, each with $WORKER_TAG set to its name."""
    return [spawn(name, *HANDLERS, *args, target=broker,
                  env={"WORKER_TAG": name, **(env or {}).get(name, {})}) for name in names]


async def served_by(requester: Requester, command: str, data: dict[str, Any], n: int,
                    at_once: int = 1, route: Route | None = None) -> Counter[str]:
    """Send ``n`` requests, ``at_once`` in flight; count the answers by worker tag."""
    counts: Counter[str] = Counter()
    queue = iter(range(n))

    async def lane() -> None:
        for _ in queue:
            counts[await requester.call(command, route=route, **data)] += 1

    await asyncio.gather(*(lane() for _ in range(at_once)))
    return counts


def state_of(broker: Broker, name: str) -> dict[str, Any]:
    return next(w for w in broker.workers() if w["name"] == name)


# ---------------------------------------------------------------------------- balance


async def test_equal_workers_share_sequential_load_evenly(broker: Broker,
                                                          spawn_worker) -> None:
    """The seed's least_loaded split 2 / 37 / 51: figures of idle workers went stale."""
    fleet(spawn_worker, "a", "b", "c")
    async with Requester(broker.requester_url) as requester:
        counts = await served_by(requester, "nap", {"ms": 4}, 90)
    assert set(counts) == {"a", "b", "c"}, counts
    assert all(18 <= n <= 40 for n in counts.values()), counts  # 20%-45% of 90


async def test_a_worker_three_times_slower_gets_clearly_less(broker: Broker,
                                                             spawn_worker) -> None:
    fleet(spawn_worker, "fast1", "fast2", "slow", env={"slow": {"NAP_FACTOR": "3"}})
    async with Requester(broker.requester_url) as requester:
        counts = await served_by(requester, "nap", {"ms": 20}, 240, at_once=16)
    assert counts["slow"] < 0.6 * min(counts["fast1"], counts["fast2"]), counts


async def test_a_heavier_worker_gets_more(broker: Broker, spawn_worker) -> None:
    spawn_worker("light", *HANDLERS, "--weight", "1", env={"WORKER_TAG": "light"})
    spawn_worker("heavy", *HANDLERS, "--weight", "3", env={"WORKER_TAG": "heavy"})
    async with Requester(broker.requester_url) as requester:
        counts = await served_by(requester, "nap", {"ms": 20}, 200, at_once=16)
    assert counts["heavy"] > 1.5 * counts["light"], counts


# ---------------------------------------------------------------------------- ejection


def test_a_handlers_own_errors_never_eject_its_worker(broker_factory, spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_EJECT_AFTER": "2"})
    fleet(spawn_worker, "only", broker=broker)

    async def run() -> None:
        async with Requester(broker.requester_url) as requester:
            for _ in range(6):
                answer = await requester.request("explode")
                assert not answer.success and "kaboom" in (answer.error or "")
                answer = await requester.request("calculate", {"a": 1, "b": 0, "op": "/"})
                assert not answer.success
            assert await requester.call("nap", ms=1) == "only"

    asyncio.run(run())
    assert state_of(broker, "only")["state"] == "online"


@pytest.mark.heavy  # (12 s: in CI and with --heavy)
def test_a_worker_whose_jobs_hang_is_ejected_then_probed_back(broker_factory,
                                                             spawn_worker) -> None:
    """Leases that ran out are faults of the worker; timeouts are not (a requester
    chooses them, and must not be able to eject workers with them)."""
    broker = broker_factory(env={"BROKER_EJECT_AFTER": "2", "BROKER_EJECT_SECONDS": "6"})
    fleet(spawn_worker, "hangs", "steady", broker=broker)
    hangs = state_of(broker, "hangs")["worker_id"]

    async def run() -> None:
        async with Requester(broker.requester_url) as requester:
            # timeouts: no verdict on the worker
            for answer in await _send_to(broker, hangs, "slow", {"seconds": 5}, 0.3, times=3):
                assert answer["code"] == "timeout"
            assert state_of(broker, "hangs")["state"] == "online"
            # two leases run out in a row on the same worker
            for answer in await _send_to(broker, hangs, "hangs", {"seconds": 30}, 20, times=2):
                assert answer["code"] == "lease_expired", answer
            await asyncio.to_thread(wait_for, lambda: state_of(broker, "hangs")["state"]
                                    == "ejected", 10, "the worker ejected")
            listed = broker.manage("workers").stdout
            assert "ejected until" in listed and "2 infrastructure failure(s) in a row" in \
                listed, listed
            counts = await served_by(requester, "nap", {"ms": 1}, 20)
            assert counts == {"steady": 20}  # out of rotation
            await asyncio.to_thread(wait_for, lambda: state_of(broker, "hangs")["state"]
                                    == "probing", 15, "its time out to end")
            # Its time is up: the next request is its probe.
            counts = await served_by(requester, "nap", {"ms": 1}, 40)
            assert counts["hangs"] >= 1, counts
            assert state_of(broker, "hangs")["state"] == "online"

    asyncio.run(run())


async def _send_to(broker: Broker, worker_id: str, action: str, params: dict[str, Any],
                   timeout: float, times: int) -> list[dict[str, Any]]:
    """``manage.py send``, ``times`` times one after the other (in one process): a
    request for one named worker."""
    argv = ["send", worker_id, action, json.dumps(params), "--timeout", str(timeout)]
    done = await asyncio.to_thread(broker.manage_many, *[argv] * times)
    return [json.loads(d.stdout) for d in done]


# ---------------------------------------------------------------------------- selectors


async def test_a_selector_picks_labelled_workers_and_names_what_matched_nobody(
        broker: Broker, spawn_worker) -> None:
    spawn_worker("gpu", *HANDLERS, "--label", "gpu=a100", "--label", "region=eu",
                 env={"WORKER_TAG": "gpu"})
    spawn_worker("cpu", *HANDLERS, "--label", "gpu=none", env={"WORKER_TAG": "cpu"})
    assert state_of(broker, "gpu")["labels"] == {"gpu": "a100", "region": "eu"}
    async with Requester(broker.requester_url) as requester:
        counts = await served_by(requester, "nap", {"ms": 1}, 12,
                                 route=Route(select={"gpu": "a100"}))
        assert counts == {"gpu": 12}
    async with websockets.connect(broker.requester_url) as ws:  # as a seed client would
        await ws.send(json.dumps({"request_id": "r1", "command": "nap",
                                  "select": {"gpu": "h100"}}))
        answer = json.loads(await ws.recv())
    assert answer["success"] is False and answer["code"] == "no_workers"
    assert answer["error"] == "No available workers: no worker offering 'nap' has gpu=h100"


# ---------------------------------------------------------------------------- affinity


async def test_one_affinity_key_one_worker_and_only_a_leaving_workers_keys_move(
        broker: Broker, spawn_worker) -> None:
    workers = fleet(spawn_worker, "a", "b", "c")
    keys = [f"user-{n}" for n in range(18)]
    async with Requester(broker.requester_url) as requester:
        async def home(key: str) -> str:
            seen = {await requester.call("nap", ms=1, route=Route(affinity=key))
                    for _ in range(3)}
            assert len(seen) == 1, (key, seen)
            return seen.pop()

        before = {k: await home(k) for k in keys}
        assert len(set(before.values())) >= 2, before
        gone = before[keys[0]]
        next(w for w in workers if w.name == gone).stop(signal.SIGTERM)
        await until(lambda: len(broker.workers()) == 2, 15, "the worker gone")
        after = {k: await home(k) for k in keys}
    assert {k for k in keys if after[k] != before[k]} == \
        {k for k in keys if before[k] == gone}


# ---------------------------------------------------------------------------- canary


def test_a_canary_setting_routes_its_share_to_that_version(broker_factory,
                                                          spawn_worker) -> None:
    broker = broker_factory(env={"BROKER_CANARY": "nap=2.1:25"})
    for name, version in [("old1", "2.0"), ("old2", "2.0"), ("new", "2.1")]:
        spawn_worker(name, *HANDLERS, "--version", version, target=broker,
                     env={"WORKER_TAG": name})

    async def run() -> Counter[str]:
        async with Requester(broker.requester_url) as requester:
            return await served_by(requester, "nap", {"ms": 1}, 200, at_once=4)

    counts = asyncio.run(run())
    assert 25 <= counts["new"] <= 80, counts  # 25% of 200 is 50
    assert counts["old1"] > 30 and counts["old2"] > 30, counts


# ---------------------------------------------------------------------------- hedging


async def test_a_slow_copy_is_hedged_and_the_first_answer_wins(broker_factory,
                                                               spawn_worker) -> None:
    broker = broker_factory()  # its hedging budget and latency figures start from zero
    workers = fleet(spawn_worker, "a", "b", broker=broker)
    async with Requester(broker.requester_url) as requester:
        await served_by(requester, "lookup", {"ms": 5}, 40)  # the command's p95 learnt
        answers: list[ApiResponse] = []
        started = time.monotonic()
        # Slow on 'a' only: those that land there are hedged to 'b'. The balancer
        # chooses by load and latency, so which land on 'a' is its choice: ask until
        # two were hedged (or 30 asked).
        for _ in range(30):
            answers.append(await requester.request("lookup", {"ms": 5, "slow_on": "a"}))
            if sum(bool(a.route and a.route.get("hedged")) for a in answers) == 2:
                break
        took = time.monotonic() - started
    assert all(a.success and a.data == "b" for a in answers), answers
    hedged = [a for a in answers if a.route and a.route.get("hedged")]
    assert hedged and all(a.route == {"attempts": 2, "hedged": True} for a in hedged)
    assert took < 4, took  # not 3 s for each that landed on 'a'
    await until(lambda: sum(w["in_flight"] for w in broker.workers()) == 0, 5,
                "the slower copies cancelled")
    assert "Cancelling request" in workers[0].log()


async def test_a_command_not_opted_in_is_never_hedged(broker: Broker, spawn_worker) -> None:
    fleet(spawn_worker, "a", "b")
    async with Requester(broker.requester_url) as requester:
        for _ in range(40):
            await requester.call("slow", seconds=0.005)
        answers = [await requester.request("slow", {"seconds": 0.3}) for _ in range(4)]
    assert all(a.success and a.route is None for a in answers), answers


# ---------------------------------------------------------------------------- explained


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_a_failover_is_told_in_the_answer_and_the_history_row(
        broker_factory, spawn_worker) -> None:
    broker = broker_factory()  # the one history row of 'slow'
    workers = fleet(spawn_worker, "a", "b", broker=broker)
    async with Requester(broker.requester_url) as requester:
        call = asyncio.ensure_future(requester.request("slow", {"seconds": 2}))
        await until(lambda: any(w["in_flight"] for w in broker.workers()), 10, "placed")
        first = next(w for w in broker.workers() if w["in_flight"])
        next(w for w in workers if w.name == first["name"]).stop(signal.SIGKILL)
        answer = await asyncio.wait_for(call, 15)
    assert answer.success and answer.route == {"attempts": 2,
                                               "failover_from": [first["worker_id"]]}

    def row() -> tuple | None:
        with sqlite3.connect(broker.workdir / "broker.sqlite3") as db:
            return db.execute("SELECT attempts, routing FROM dispatch_requestrecord "
                              "WHERE command = 'slow'").fetchone()

    attempts, routing = wait_for(row, 10, "the history row")
    parts = routing.split(" | ")
    assert attempts == 2 and len(parts) == 2, routing
    assert parts[0].startswith("least_loaded: 2 of 2; ") and " vs " in parts[0], routing
    assert parts[1].startswith("least_loaded: 1 of 1; "), routing


def test_explain_shows_the_next_choice_without_sending_anything(broker: Broker,
                                                                spawn_worker) -> None:
    spawn_worker("gpu", *HANDLERS, "--label", "gpu=a100", env={"WORKER_TAG": "gpu"})
    spawn_worker("cpu", *HANDLERS, env={"WORKER_TAG": "cpu"})
    drained, out, selected, found = (done.stdout for done in broker.manage_many(
        ["drain", state_of(broker, "cpu")["worker_id"]], ["explain", "nap"],
        ["explain", "nap", '{"select": {"gpu": "h100"}}'], ["explain", "nap", "--json"]))
    assert "draining" in drained, drained
    gpu_id = state_of(broker, "gpu")["worker_id"]
    assert out.startswith(f"Next request goes to {gpu_id}\n  routing: least_loaded: 1 of 2; "
                          "1 draining; "), out
    assert "draining" in out and "gpu=a100" in out and "SCORE" in out, out
    assert "Next request fails: no worker offering it has gpu=h100" in selected, selected
    found = json.loads(found)
    assert found["worker_id"] == gpu_id and len(found["candidates"]) == 2
    assert all(w["in_flight"] == 0 for w in broker.workers())  # nothing was sent
