"""Both worker registries (in-process and Redis): choose-and-reserve, release, statistics."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from dispatch.registry.redis import RedisRegistry
from dispatch.registry import Registry, WorkerEntry
from dispatch.registry.memory import MemoryRegistry


def entry(worker_id: str, *commands: str, max_concurrency: int = 2, channel: str = "",
          weight: float = 1.0) -> WorkerEntry:
    return WorkerEntry(worker_id=worker_id, name=worker_id, channel=channel or f"ch-{worker_id}",
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
    assert (await registry.reserve("nothing")) == (None, False)


async def test_max_concurrency_is_respected_and_release_frees_a_slot(
        registry: Registry) -> None:
    await registry.add(entry("a", max_concurrency=2))
    assert (await registry.reserve("echo")).worker is not None
    assert (await registry.reserve("echo")).worker is not None
    full = await registry.reserve("echo")
    assert full.worker is None and full.capable  # capable but busy: the request waits
    await registry.release("a", latency_ms=12.0, ok=True)
    assert (await registry.reserve("echo")).worker is not None


async def test_release_keeps_running_statistics(registry: Registry) -> None:
    await registry.add(entry("a"))
    for latency, ok in [(10.0, True), (20.0, True), (30.0, False)]:
        await registry.reserve("echo")
        await registry.release("a", latency_ms=latency, ok=ok)
    a = await registry.get("a")
    assert a is not None
    assert (a.in_flight, a.completed, a.errors) == (0, 2, 1)
    assert 10.0 < a.latency_ms < 30.0 and 0 < a.error_rate < 1


async def test_reserve_a_named_worker(registry: Registry) -> None:
    await registry.add(entry("a", max_concurrency=1))
    assert (await registry.reserve("anything", worker_id="a")).worker is not None
    assert (await registry.reserve("anything", worker_id="a")) == (None, True)
    assert (await registry.reserve("anything", worker_id="zz")) == (None, False)


async def test_draining_worker_gets_no_new_work(registry: Registry) -> None:
    await registry.add(entry("a"))
    assert await registry.set_draining("a", True)
    assert (await registry.reserve("echo")).worker is None
    assert not await registry.set_draining("zz", True)


async def test_takeover_keeps_the_newer_connection(registry: Registry) -> None:
    await registry.add(entry("a", channel="old"))
    replaced = await registry.add(entry("a", "resize", channel="new"))
    assert replaced is not None and replaced.channel == "old"
    assert await registry.remove("a", "old") is None  # the old socket closing changes nothing
    assert (await registry.reserve("resize")).worker is not None
    assert (await registry.reserve("echo")) == (None, False)
    assert await registry.remove("a", "new") is not None
    assert await registry.count() == 0


async def test_a_batch_of_reservations_counts_each_choice_against_the_next(
        registry: Registry) -> None:
    await registry.add(entry("a", "echo", max_concurrency=2))
    await registry.add(entry("b", "echo", "resize", max_concurrency=1))
    got = await registry.reserve_many([("echo", None), ("resize", None), ("echo", None),
                                       ("echo", None), ("nothing", None), ("echo", "a")])
    taken = [r.worker.worker_id if r.worker else None for r in got]
    # three slots in all: 'b' goes to whichever request gets it first, never twice
    assert sorted(t for t in taken if t) == ["a", "a", "b"]
    assert taken.count("b") == 1 and got[4] == (None, False)
    assert all(r.capable for i, r in enumerate(got) if i != 4)  # the rest wait for a slot
    await registry.release_many([("a", 5.0, True), ("a", None, False), ("b", 7.0, True)])
    a, b = await registry.get("a"), await registry.get("b")
    assert a is not None and b is not None
    assert (a.in_flight, a.completed, a.errors, b.in_flight, b.completed) == (0, 1, 1, 0, 1)
