"""The Redis registry against a real Redis: the in-process registry's behaviours, and
what only a shared registry must do (atomic reservations across processes, global
round robin, expiry of workers whose process died, outages)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from dispatch.balancing import Health, Wanted
from dispatch.registry.redis import RedisRegistry
from dispatch.registry import RegistryUnavailable, WorkerEntry
from dispatch.registry.memory import MemoryRegistry
from tests.redis_fixture import RedisServer
from tests.test_registry import entry

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def make_registry(redis_url: str, redis_prefix: str
                        ) -> AsyncIterator[Callable[..., RedisRegistry]]:
    """``make(ttl=...)``: registries sharing one prefix, as broker processes would."""
    made: list[RedisRegistry] = []

    def make(ttl: float = 30.0, url: str | None = None) -> RedisRegistry:
        made.append(RedisRegistry(url or redis_url, prefix=redis_prefix, ttl=ttl))
        return made[-1]

    yield make
    for registry in made:
        await registry.close()


@pytest.fixture
def registry(make_registry: Callable[..., RedisRegistry]) -> RedisRegistry:
    return make_registry()


# ------------------------------------------------------------- the same arithmetic
# (the behaviours both registries share are in tests/test_registry.py, run on both)

async def test_release_keeps_the_same_statistics_as_the_memory_registry(
        registry: RedisRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    # One clock for both: latency estimates decay with time, and on a busy machine the
    # two registries' steps would otherwise be apart by different amounts.
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    memory = MemoryRegistry()
    for reg in (registry, memory):
        await reg.add(entry("a", max_concurrency=4))
        for latency, health in [(10.0, Health.OK), (None, Health.OK), (20.0, Health.OK),
                                (30.0, Health.FAULT), (7.5, Health.ERROR),
                                (50.0, Health.UNKNOWN)]:
            await reg.reserve("echo")
            await reg.release("a", latency_ms=latency, health=health)
        await reg.release("a", latency_ms=1.0, health=Health.OK)  # one release too many: stays at 0
    shared, local = await registry.get("a"), await memory.get("a")
    assert shared is not None and local is not None
    stats = ("in_flight", "completed", "errors", "failures", "error_rate")
    assert [getattr(shared, s) for s in stats] == [getattr(local, s) for s in stats]
    assert shared.latency_ms == pytest.approx(local.latency_ms, rel=1e-3)
    assert shared.in_flight == 0 and (shared.completed, shared.errors) == (4, 2)


# ------------------------------------------------------------- shared state

async def test_an_entry_reads_back_field_for_field(registry: RedisRegistry) -> None:
    original = WorkerEntry(worker_id="w:1", name="Wörker", connection="specific.abc!def",
                           commands=frozenset({"echo", "resize", "a b"}), weight=2.5,
                           max_concurrency=7, process="host:12:ab12", address="10.0.0.1:5",
                           session_id="s-1", connected_at=1700000000.125, latency_ms=0.1,
                           error_rate=1 / 3, draining=True)
    assert await registry.add(original) is None
    [listed] = await registry.all()
    got = await registry.get("w:1")
    assert got == listed
    assert got is not None and got.last_heartbeat >= original.last_heartbeat  # set by add
    got.last_heartbeat = original.last_heartbeat
    assert got == original
    assert await registry.connections(["w:1", "nobody"]) == {"w:1": "specific.abc!def"}


async def test_two_processes_never_exceed_max_concurrency(
        make_registry: Callable[..., RedisRegistry]) -> None:
    first, second = make_registry(), make_registry()
    await first.add(entry("narrow", max_concurrency=3))
    await first.add(entry("full-one", max_concurrency=1))
    await first.reserve("echo", worker_id="full-one")  # a full candidate along the way
    holding = peak = taken = 0

    async def attempt(registry: RedisRegistry) -> None:
        nonlocal holding, peak, taken
        res = await registry.reserve("echo")
        if res.worker is None:
            assert res.capable
            return
        assert res.worker.worker_id == "narrow" and res.worker.in_flight <= 3
        holding += 1
        taken += 1
        peak = max(peak, holding)
        await asyncio.sleep(random.uniform(0, 0.005))
        holding -= 1
        await registry.release("narrow", latency_ms=1.0, health=Health.OK)

    await asyncio.gather(*(attempt(first if i % 2 else second) for i in range(200)))
    assert peak == 3 and taken >= 3
    narrow = await second.get("narrow")
    assert narrow is not None and narrow.in_flight == 0 and narrow.completed == taken


async def test_exactly_the_free_slots_are_taken_by_a_burst(
        make_registry: Callable[..., RedisRegistry]) -> None:
    registries = [make_registry(), make_registry()]
    await registries[0].add(entry("narrow", max_concurrency=3))
    results = await asyncio.gather(*(registries[i % 2].reserve("echo") for i in range(200)))
    assert sum(r.worker is not None for r in results) == 3
    assert all(r.capable for r in results)


async def test_batches_from_two_processes_take_exactly_the_free_slots(
        make_registry: Callable[..., RedisRegistry]) -> None:
    registries = [make_registry(), make_registry()]
    await registries[0].add(entry("narrow", max_concurrency=3))
    await registries[0].add(entry("wide", max_concurrency=5))
    batches = await asyncio.gather(*(registries[i % 2].reserve_many([Wanted("echo")] * 10)
                                     for i in range(6)))
    taken = [r.worker.worker_id for batch in batches for r in batch if r.worker]
    assert sorted(taken) == ["narrow"] * 3 + ["wide"] * 5
    assert all(r.capable for batch in batches for r in batch)


def test_one_registry_serves_several_event_loops(
        make_registry: Callable[..., RedisRegistry]) -> None:
    """Each loop gets its own connection pool (daphne, async_to_sync, tests)."""
    registry = make_registry()

    def run_in_new_loop(call: Callable[[], Any]) -> Any:
        async def run() -> Any:
            try:
                return await call()
            finally:
                await registry.close()  # this loop's pool goes with the loop
        return asyncio.run(run())

    run_in_new_loop(lambda: registry.add(entry("a", max_concurrency=50)))
    errors: list[BaseException] = []

    def use() -> None:
        async def run() -> None:
            for _ in range(20):
                res = await registry.reserve("echo")
                assert res.worker is not None
                await registry.release("a", latency_ms=1.0, health=Health.OK)
        try:
            run_in_new_loop(run)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    final = run_in_new_loop(lambda: registry.get("a"))
    assert final is not None and (final.in_flight, final.completed) == (0, 60)


async def test_round_robin_cycles_over_all_workers_globally(
        make_registry: Callable[..., RedisRegistry], settings: Any) -> None:
    settings.BROKER = {**settings.BROKER, "STRATEGY": "round_robin"}
    first, second = make_registry(), make_registry()
    for name in ("w1", "w2", "w3"):
        await first.add(entry(name))
    chosen = []
    for i in range(30):
        res = await (first if i % 2 else second).reserve("echo")
        assert res.worker is not None
        chosen.append(res.worker.worker_id)
        await first.release(res.worker.worker_id, latency_ms=1.0, health=Health.OK)
    # every window of three consecutive choices, whichever process made them, is w1..w3
    assert all(len(set(chosen[i:i + 3])) == 3 for i in range(len(chosen) - 2))


async def test_a_worker_whose_heartbeats_stopped_is_pruned(
        make_registry: Callable[..., RedisRegistry], redis_url: str,
        redis_prefix: str) -> None:
    registry = make_registry(ttl=1.0)
    await registry.add(entry("silent", "echo", "resize"))
    await registry.add(entry("steady"))
    for _ in range(6):
        await asyncio.sleep(0.2)
        assert await registry.touch("steady")
    # "silent" is dead for every read, and its traces are gone
    assert [w.worker_id for w in await registry.all()] == ["steady"]
    assert await registry.count() == 1
    assert await registry.get("silent") is None
    assert await registry.connections(["silent", "steady"]) == {"steady": "ch-steady"}
    assert (await registry.reserve("resize"))[:2] == (None, False)
    assert (await registry.reserve("x", worker_id="silent"))[:2] == (None, False)
    assert not await registry.touch("silent")  # dead stays dead until added again
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = set(await client.keys(f"{redis_prefix}:*"))
        assert f"{redis_prefix}:worker:silent" not in keys
        assert f"{redis_prefix}:command:resize" not in keys
        assert await client.smembers(f"{redis_prefix}:command:echo") == {"steady"}
        for key in keys:  # the safety net: every key expires unless refreshed
            assert await client.pttl(key) > 0, key
    finally:
        await client.aclose()
    # a heartbeat dated in the past counts as silence too
    assert await registry.touch("steady", when=time.time() - 60)
    assert await registry.count() == 0


async def test_broker_processes_say_they_are_alive(
        make_registry: Callable[..., RedisRegistry]) -> None:
    registry = make_registry()
    await registry.process_alive("p1", ttl=0.3)
    await registry.process_alive("p2", ttl=30)
    await registry.process_alive("p3", ttl=30)
    assert await registry.live_processes() == {"p1", "p2", "p3"}
    await registry.process_gone("p3")
    await asyncio.sleep(0.4)
    assert await registry.live_processes() == {"p2"}


async def test_redis_outage_raises_registry_unavailable_then_recovers(
        make_registry: Callable[..., RedisRegistry], redis_server: RedisServer) -> None:
    registry = make_registry(url=redis_server.url)
    await registry.add(entry("a"))
    assert (await registry.reserve("echo")).worker is not None
    redis_server.stop()
    started = time.monotonic()
    calls = [registry.reserve("echo"), registry.release("a", latency_ms=1.0, health=Health.OK),
             registry.add(entry("b")), registry.touch("a"), registry.all(),
             registry.live_processes()]
    for call in calls:
        with pytest.raises(RegistryUnavailable, match="^Redis unavailable: ") as failed:
            await call
        assert isinstance(failed.value, ConnectionError)
    assert time.monotonic() - started < 5  # fails fast: the broker answers with an error
    redis_server.start()
    # a fresh Redis (no persistence) forgot everything; the broker re-adds on the next
    # heartbeat, and the pooled connections that Redis closed are not reused
    assert not await registry.touch("a")
    await registry.add(entry("a"))
    res = await registry.reserve("echo")
    assert res.worker is not None and res.worker.worker_id == "a"


async def test_connections_closed_by_a_redis_restart_are_not_reused(
        make_registry: Callable[..., RedisRegistry], redis_server: RedisServer) -> None:
    registry = make_registry(url=redis_server.url)
    # a few pooled connections, all idle when Redis goes away
    await asyncio.gather(*(registry.add(entry(f"w{i}")) for i in range(4)))
    redis_server.stop()
    redis_server.start()
    await asyncio.sleep(0.1)  # a running loop sees the closed sockets
    for _ in range(8):  # no RegistryUnavailable: each is reopened as it is lent
        assert await registry.count() == 0
        assert not await registry.touch("w1")


def test_the_lua_ring_has_as_many_points_as_the_python_one() -> None:
    from dispatch.balancing import RING_POINTS

    prelude = (Path(__file__).parent.parent / "dispatch/redis/lua/prelude.lua").read_text()
    assert f"local RING_POINTS = {RING_POINTS}\n" in prelude


async def test_both_registries_send_an_affinity_key_to_the_same_worker(
        registry: RedisRegistry) -> None:
    memory = MemoryRegistry()
    for reg in (registry, memory):
        for i in range(20):
            await reg.add(entry(f"w{i}", max_concurrency=100))
    keys = [Wanted("echo", affinity=f"key-{n}") for n in range(40)]
    shared = [r.worker.worker_id for r in await registry.reserve_many(keys)]  # type: ignore
    local = [r.worker.worker_id for r in await memory.reserve_many(keys)]  # type: ignore
    assert shared == local


async def test_answers_kept_in_redis_are_looked_up_together(
        registry: RedisRegistry, redis_url: str) -> None:
    """Every request sent asks whether its id was answered lately: the lookups of one
    moment go to Redis as one command, each asker getting its own answer (or None),
    and an outage is each one's error."""
    from dispatch.core.results import RedisResults

    writer, reader = (RedisResults(registry.target, registry.prefix) for _ in range(2))
    for i in range(0, 40, 2):
        writer.put("alice", f"r{i}", f'{{"request_id": "r{i}"}}')
    await asyncio.sleep(0.2)  # written in a batch of their own
    plain = aioredis.Redis.from_url(redis_url)
    before = (await plain.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
    got = await asyncio.gather(*(reader.get("alice", f"r{i}") for i in range(40)),
                               reader.get("bob", "r0"))
    after = (await plain.info("commandstats")).get("cmdstat_mget", {}).get("calls", 0)
    await plain.aclose()
    assert got[:40] == [f'{{"request_id": "r{i}"}}' if i % 2 == 0 else None
                        for i in range(40)]
    assert got[40] is None  # another credential's id: not its answer
    assert after - before == 1  # 41 lookups, one round trip
