"""Both worker registries (in-process and Redis): choose-and-reserve, release, statistics."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest

from dispatch.balancing import Health, Wanted
from dispatch.registry.redis import RedisRegistry
from dispatch.registry import Registry, WorkerEntry
from dispatch.registry.memory import MemoryRegistry


def entry(worker_id: str, *commands: str, max_concurrency: int = 2, connection: str = "",
          weight: float = 1.0) -> WorkerEntry:
    return WorkerEntry(worker_id=worker_id, name=worker_id,
                       connection=connection or f"ch-{worker_id}",
                       commands=frozenset(commands or ("echo",)),
                       max_concurrency=max_concurrency, weight=weight)


@pytest.fixture(params=["memory", "redis"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """Each behaviour runs on the in-process registry and on the Redis one."""
    if request.param == "memory":
        yield MemoryRegistry()
        return
    shared = RedisRegistry(request.getfixturevalue("redis_url"),
                           prefix=request.getfixturevalue("redis_prefix"), ttl=30.0)
    yield shared
    await shared.close()


async def test_only_workers_offering_the_command_are_chosen(registry: Registry) -> None:
    await registry.add(entry("a", "echo"))
    await registry.add(entry("b", "resize"))
    for _ in range(2):
        res = await registry.reserve("resize")
        assert res.worker is not None and res.worker.worker_id == "b"
    assert (await registry.reserve("nothing"))[:2] == (None, False)


async def test_max_concurrency_is_respected_and_release_frees_a_slot(
        registry: Registry) -> None:
    await registry.add(entry("a", max_concurrency=2))
    assert (await registry.reserve("echo")).worker is not None
    assert (await registry.reserve("echo")).worker is not None
    full = await registry.reserve("echo")
    assert full.worker is None and full.capable  # capable but busy: the request waits
    await registry.release("a", latency_ms=12.0, health=Health.OK)
    assert (await registry.reserve("echo")).worker is not None


async def test_release_keeps_running_statistics(registry: Registry) -> None:
    await registry.add(entry("a"))
    for latency, health in [(10.0, Health.OK), (12.0, Health.OK), (30.0, Health.FAULT),
                            (None, Health.ERROR), (900.0, Health.UNKNOWN)]:
        await registry.reserve("echo")
        await registry.release("a", latency_ms=latency, health=health)
    a = await registry.get("a")
    assert a is not None
    # A fault counts toward ejection, a handler's unmeant error only in the error rate,
    # a timeout (no verdict) in neither, but its latency counts.
    assert (a.in_flight, a.completed, a.errors, a.failures) == (0, 2, 2, 1)
    # A slower answer raises the estimate at once, by at most PEAK_STEP each time. (It
    # also fades with the time between the samples: 2% is 200 ms of a loaded machine.)
    assert a.latency_ms == pytest.approx(12.0 * 1.5 * 1.5, rel=2e-2)
    assert 0 < a.error_rate < 1
    before = a.latency_ms
    await registry.reserve("echo")
    await registry.release("a", latency_ms=10.0, health=Health.OK)  # a faster one: gently
    a = await registry.get("a")
    assert a is not None and 10.0 < a.latency_ms < before and a.failures == 0


async def test_reserve_a_named_worker(registry: Registry) -> None:
    await registry.add(entry("a", max_concurrency=1))
    assert (await registry.reserve("anything", worker_id="a")).worker is not None
    assert (await registry.reserve("anything", worker_id="a"))[:2] == (None, True)
    assert (await registry.reserve("anything", worker_id="zz"))[:2] == (None, False)


async def test_draining_worker_gets_no_new_work(registry: Registry) -> None:
    await registry.add(entry("a"))
    assert await registry.set_draining("a", True)
    assert (await registry.reserve("echo")).worker is None
    assert not await registry.set_draining("zz", True)


async def test_takeover_keeps_the_newer_connection(registry: Registry) -> None:
    await registry.add(entry("a", connection="old"))
    replaced = await registry.add(entry("a", "resize", connection="new"))
    assert replaced is not None and replaced.connection == "old"
    assert await registry.remove("a", "old") is None  # the old socket closing changes nothing
    assert (await registry.reserve("resize")).worker is not None
    assert (await registry.reserve("echo"))[:2] == (None, False)
    assert await registry.remove("a", "new") is not None
    assert await registry.count() == 0


async def test_a_batch_of_reservations_counts_each_choice_against_the_next(
        registry: Registry) -> None:
    await registry.add(entry("a", "echo", max_concurrency=2))
    await registry.add(entry("b", "echo", "resize", max_concurrency=1))
    got = await registry.reserve_many([Wanted("echo"), Wanted("resize"), Wanted("echo"),
                                       Wanted("echo"), Wanted("nothing"), Wanted("echo", "a")])
    taken = [r.worker.worker_id if r.worker else None for r in got]
    # three slots in all: 'b' goes to whichever request gets it first, never twice
    assert sorted(t for t in taken if t) == ["a", "a", "b"]
    assert taken.count("b") == 1 and got[4][:2] == (None, False)
    assert all(r.capable for i, r in enumerate(got) if i != 4)  # the rest wait for a slot
    await registry.release_many([("a", 5.0, Health.OK), ("a", None, Health.FAULT), ("b", 7.0, Health.OK)])
    a, b = await registry.get("a"), await registry.get("b")
    assert a is not None and b is not None
    assert (a.in_flight, a.completed, a.errors, b.in_flight, b.completed) == (0, 1, 1, 0, 1)


# ---------------------------------------------------------------------------- routing


@pytest.fixture
def eject_fast(settings: Any) -> None:
    settings.BROKER = {**settings.BROKER, "EJECT_AFTER": 3, "EJECT_SECONDS": 0.3,
                       "EJECT_MAX_SHARE": 0.5}


async def fail(registry: Registry, worker_id: str, times: int) -> None:
    for _ in range(times):
        assert (await registry.reserve("echo", worker_id=worker_id)).worker is not None
        await registry.release(worker_id, latency_ms=None, health=Health.FAULT)


async def test_consecutive_infrastructure_failures_eject_then_a_probe_brings_it_back(
        registry: Registry, eject_fast: None) -> None:
    for name in ("bad", "good1", "good2"):
        await registry.add(entry(name, max_concurrency=4))
    await fail(registry, "bad", 2)
    await registry.reserve("echo", worker_id="bad")
    await registry.release("bad", latency_ms=3.0, health=Health.OK)  # a success resets the count
    await fail(registry, "bad", 2)
    assert (await registry.get("bad")).state == "online"  # type: ignore[union-attr]
    await fail(registry, "bad", 1)
    bad = await registry.get("bad")
    assert bad is not None and bad.state == "ejected" and bad.ejections == 1
    assert "3 infrastructure failure(s) in a row" in bad.ejected_why
    picks = [(await registry.reserve("echo")).worker for _ in range(6)]
    assert {w.worker_id for w in picks if w} == {"good1", "good2"}  # type: ignore[union-attr]
    for w in picks:
        await registry.release(w.worker_id, latency_ms=None, health=Health.UNKNOWN)  # type: ignore[union-attr]
    await asyncio.sleep(0.35)
    probe = await registry.reserve("echo", worker_id="bad")
    assert probe.worker is not None and (await registry.get("bad")).state == "probing"  # type: ignore[union-attr]
    # On trial: one request at a time.
    assert (await registry.reserve("echo", worker_id="bad")).worker is None
    await registry.release("bad", latency_ms=2.0, health=Health.OK)
    assert (await registry.get("bad")).state == "online"  # type: ignore[union-attr]


async def test_a_failed_probe_ejects_again_for_longer(registry: Registry,
                                                      eject_fast: None) -> None:
    await registry.add(entry("bad", max_concurrency=4))
    await registry.add(entry("good", max_concurrency=4))
    await fail(registry, "bad", 3)
    first = await registry.get("bad")
    await asyncio.sleep(0.35)
    await fail(registry, "bad", 1)  # the probe fails: out at once, twice as long
    again = await registry.get("bad")
    assert first is not None and again is not None and again.state == "ejected"
    assert again.ejections == 2
    assert again.ejected_until - time.time() > 0.45


async def test_never_more_than_the_max_share_of_the_fleet_is_ejected(
        registry: Registry, eject_fast: None) -> None:
    for name in ("a", "b", "c", "d"):
        await registry.add(entry(name, max_concurrency=8))
    for name in ("a", "b", "c"):
        await fail(registry, name, 3)
    states = [(await registry.get(n)).state for n in "abcd"]  # type: ignore[union-attr]
    assert states.count("ejected") == 2 and states[3] == "online"


async def test_idle_workers_of_other_commands_make_no_room_for_ejections(
        registry: Registry, eject_fast: None) -> None:
    """Issue 24: four idle get_time workers let a requester's faults eject both echo
    workers (the share counted the whole fleet)."""
    for name in ("a", "b"):
        await registry.add(entry(name, max_concurrency=8))
    for name in ("c", "d", "e", "f"):
        await registry.add(entry(name, "get_time"))
    for name in ("a", "b"):
        await fail(registry, name, 3)
    states = [(await registry.get(n)).state for n in "ab"]  # type: ignore[union-attr]
    assert sorted(states) == ["ejected", "online"]
    assert (await registry.reserve("echo")).worker is not None  # echo is still served


async def test_a_selector_matches_labels_and_says_which_matched_nobody(
        registry: Registry) -> None:
    await registry.add(WorkerEntry(worker_id="g", name="g", connection="ch-g",
                                   commands=frozenset({"train"}),
                                   labels={"gpu": "a100", "region": "eu"}, version="2.1"))
    await registry.add(entry("c", "train"))
    for _ in range(3):
        got = await registry.reserve_many([Wanted("train", select=(("gpu", "a100"),))])
        assert got[0].worker is not None and got[0].worker.worker_id == "g"
        assert got[0].worker.labels == {"gpu": "a100", "region": "eu"}
        await registry.release("g", latency_ms=1.0, health=Health.OK)
    miss = (await registry.reserve_many([Wanted("train", select=(("gpu", "h100"),))]))[0]
    assert miss.worker is None and not miss.capable and miss.unmatched == "gpu=h100"
    # The label exists, on a worker without the command: still said, not "no worker".
    await registry.add(entry("r", "resize"))
    miss = (await registry.reserve_many([Wanted("resize", select=(("gpu", "a100"),))]))[0]
    assert miss.worker is None and not miss.capable and miss.unmatched == "gpu=a100"
    assert "1 selector" in miss.why  # explain's "resize: 0 of 0" was the same mistake


async def test_explain_takes_no_slot_and_lists_every_candidate(registry: Registry) -> None:
    await registry.add(entry("a", max_concurrency=1))
    await registry.add(entry("b", max_concurrency=1))
    await registry.set_draining("b", True)
    for _ in range(3):
        reservation, seen = await registry.explain(Wanted("echo"))
        assert reservation.worker is not None and reservation.worker.worker_id == "a"
    assert sorted(w.worker_id for w in seen) == ["a", "b"]
    assert reservation.why.startswith("least_loaded: 1 of 2; 1 draining; a ")
    assert (await registry.get("a")).in_flight == 0  # type: ignore[union-attr]


async def test_a_selector_finds_its_few_workers_in_a_large_fleet_by_label(
        registry: Registry) -> None:
    for i in range(40):
        await registry.add(WorkerEntry(worker_id=f"w{i}", name=f"w{i}", connection=f"ch-{i}",
                                       commands=frozenset({"train"}), max_concurrency=100,
                                       labels={"gpu": "a100" if i % 13 == 0 else "none"}))
    got = await registry.reserve_many([Wanted("train", select=(("gpu", "a100"),))] * 30)
    assert {r.worker.worker_id for r in got if r.worker} == {"w0", "w13", "w26", "w39"}
    for i in (0, 13, 26, 39):
        await registry.remove(f"w{i}", f"ch-{i}")
    miss = (await registry.reserve_many([Wanted("train", select=(("gpu", "a100"),))]))[0]
    assert miss.worker is None and miss.unmatched == "gpu=a100"


async def test_affinity_keeps_a_key_on_its_worker_and_moves_only_a_leaving_workers_keys(
        registry: Registry) -> None:
    for i in range(12):
        await registry.add(entry(f"w{i}", max_concurrency=100))

    async def homes() -> dict[str, str]:
        got = await registry.reserve_many([Wanted("echo", affinity=f"user-{n}")
                                           for n in range(60)])
        for r in got:
            await registry.release(r.worker.worker_id, latency_ms=None, health=Health.UNKNOWN)  # type: ignore
        return {f"user-{n}": r.worker.worker_id for n, r in enumerate(got)}  # type: ignore

    before = await homes()
    assert before == await homes() and len(set(before.values())) >= 6
    gone = before["user-0"]
    await registry.remove(gone, f"ch-{gone}")
    after = await homes()
    assert {k for k in before if after[k] != before[k]} == \
        {k for k in before if before[k] == gone}


async def test_explain_follows_an_affinity_key_as_a_reservation_would(
        registry: Registry) -> None:
    for i in range(10):
        await registry.add(entry(f"w{i}", max_concurrency=100))
    for n in range(10):
        wanted = Wanted("echo", affinity=f"k{n}")
        explained, _ = await registry.explain(wanted)
        reserved = await registry.reserve_many([wanted])
        assert explained.worker.worker_id == reserved[0].worker.worker_id  # type: ignore


async def test_reconnecting_neither_ends_an_ejection_nor_resets_its_doubling(
        registry: Registry, eject_fast: None) -> None:
    for name in ("bad", "good1", "good2"):
        await registry.add(entry(name, max_concurrency=4))
    await fail(registry, "bad", 3)
    assert await registry.remove("bad", "ch-bad") is not None  # it closes its socket
    await registry.add(entry("bad", max_concurrency=4))  # and registers again
    back = await registry.get("bad")
    assert back is not None and back.state == "ejected" and back.ejections == 1
    await registry.add(entry("bad", max_concurrency=4, connection="ch-bad-2"))  # a takeover
    again = await registry.get("bad")
    assert again is not None and again.state == "ejected" and again.ejections == 1


async def test_schemas_read_back_for_describe_and_leave_with_their_worker(
        registry: Registry) -> None:
    schemas = '{"resize":{"params":[{"name":"url","type":"str","required":true}]}}'
    described = entry("a", "resize")
    described.schemas = schemas
    await registry.add(described)
    await registry.add(entry("old", "resize"))  # a worker that sent none
    assert {e.worker_id: e.schemas for e in await registry.described()} == {
        "a": schemas, "old": ""}
    reserved = (await registry.reserve("resize", worker_id="a")).worker
    assert reserved is not None and reserved.to_dict().keys().isdisjoint({"schemas"})
    if isinstance(registry, RedisRegistry):  # apart from the hash: the hot path never reads it
        assert reserved.schemas == "" and (await registry.get("a")).schemas == ""  # type: ignore
    await registry.touch("a")
    await registry.add(entry("a", "resize", connection="ch-a-2"))  # registers again, without
    assert {e.worker_id: e.schemas for e in await registry.described()} == {"a": "", "old": ""}
    described.connection = "ch-a-3"
    await registry.add(described)
    assert await registry.remove("a", "ch-a-3") is not None
    assert [e.worker_id for e in await registry.described()] == ["old"]
    if isinstance(registry, RedisRegistry):  # its key went with it
        assert not await registry._client().exists(f"{registry.prefix}:schemas:a")
