"""The registry shared by several broker processes, kept in Redis.

Same semantics as :class:`~dispatch.registry.memory.MemoryRegistry`, plus one thing a
single process never needs: a worker whose broker process died leaves no one to
remove it, so every worker carries a heartbeat time, and a worker silent for longer
than ``ttl`` is dead. The dead are pruned on read, inside the same Lua script as the
read (as channels_redis prunes expired group members), so no call ever returns one.

Key layout, all under ``<prefix>:``::

    worker:<id>       hash    every WorkerEntry field (commands as a JSON list)
    command:<name>    set     ids of the workers offering that command
    heartbeats        zset    worker id -> time of its last heartbeat
    round-robin       string  global sequence number of choices (INCR)
    processes         zset    broker process name -> time until which it is alive
    claim:<id>        string  the owner (credential) of a worker id, kept a while after
                              it leaves (WORKER_ID_CLAIM_SECONDS)
    standing:<id>     hash    a worker's ejection record, kept as long as its claim
    label:<n>:<k>=<v> set     ids of the workers with label k=v (n: the length of k)
    ring:<command>    zset    the command's affinity ring: "<id>#<n>" -> point
    schemas:<id>      string  its commands' schemas (WorkerEntry.schemas), apart from the
                              hash so that only describe (:meth:`described`) reads them

Every key also gets a Redis TTL of twice the worker ttl, refreshed by heartbeats: a
safety net so nothing outlives a cluster that stopped for good.

Choosing and reserving (:meth:`RedisRegistry.reserve_many`, which ``reserve`` calls
too) takes two scripts rather than one: the first prunes and returns the stats of
the candidates (and the next global sequence number): all of them, or a random
sample when many offer the command, those with a selector's labels (by intersecting
label sets), or an affinity key's next workers on the ring;
:func:`dispatch.balancing.choose`, the same Python the in-process registry uses,
chooses; the second script takes a slot only if the worker is still live and
eligible, so ``max_concurrency`` holds across processes. If another process took the
last slot in between, we fetch again, a bounded number of times. This keeps the
strategies in one place, in Python, at the price of one extra round trip; the stats a
choice is based on may be a moment old, which only matters to balancing, never to
correctness. Under load the dispatcher reserves for many requests at once: still two
round trips, for the whole batch. A request for one named worker (``send``) takes
one.

Times are this host's clock (``time.time()``), passed to the scripts: broker hosts
are expected to be NTP-synchronised to well within the ttl.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

from .. import balancing, conf
from ..balancing import (RING_SUCCESSORS, SAMPLE, Choice, Health, Ring, Wanted, by_affinity,
                         choose, ejection_due, samples)
from ..errors import RegistryUnavailable, WorkerIdTaken
from ..redis import scripts
from ..redis.connection import CLIENT_OPTIONS, Clients, RedisTarget
from .base import (Outcome, Registry, Reservation, WorkerEntry, affinity_salt, canary_rules,
                   ejection_reason, log_ejection)


#: The workers one reservation chooses among: a command, a label selector, an
#: affinity key.
Pool = tuple[str, tuple[tuple[str, str], ...], "str | None"]
#: Times a reservation fetches candidates (again, after losing the race for a slot).
RESERVE_ATTEMPTS = 5
# ---------------------------------------------------------------------------- Lua
# The scripts are dispatch/redis/lua/*.lua; each says what its KEYS and ARGV are.
(ADD, REMOVE, TOUCH, CANDIDATES, RESERVE, RESERVE_MANY, EJECT, SET_DRAINING, GET, ALL,
 COUNT, CONNECTIONS) = (scripts.load("prelude", name) for name in (
    "add", "remove", "touch", "candidates", "reserve", "reserve_many", "eject",
    "set_draining", "get", "all", "count", "connections"))
RELEASE = scripts.load("release")  # no prelude: it touches only the hashes it is given

# ---------------------------------------------------------------------------- encoding

#: How a hash field is read back, by the field's annotation in WorkerEntry.
_DECODERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "bool": lambda text: text == "1",
    "frozenset[str]": lambda text: frozenset(json.loads(text)),
    "dict[str, float]": json.loads,
    "dict[str, str]": json.loads,
}


#: WorkerEntry fields kept in keys of their own, not in the worker's hash.
_APART = frozenset({"schemas"})


def _encode(entry: WorkerEntry) -> dict[str, str]:
    """Every field of ``entry`` but those :data:`_APART` as text; floats by repr, so
    they read back exactly."""
    out = {}
    for f in fields(WorkerEntry):
        if f.name in _APART:
            continue
        value = getattr(entry, f.name)
        if isinstance(value, bool):
            out[f.name] = "1" if value else "0"
        elif isinstance(value, (set, frozenset)):
            out[f.name] = json.dumps(sorted(value))
        elif isinstance(value, dict):
            out[f.name] = json.dumps(value)
        elif isinstance(value, float):
            out[f.name] = repr(value)
        else:
            out[f.name] = str(value)
    return out


def _decode(flat: list[str]) -> WorkerEntry:
    """A WorkerEntry from a hash as Lua returns it: [field, value, field, value, ...]."""
    raw = dict(zip(flat[::2], flat[1::2]))
    return WorkerEntry(**{f.name: _DECODERS.get(str(f.type), str)(raw[f.name])
                          for f in fields(WorkerEntry) if f.name in raw})


@functools.lru_cache(maxsize=1024)
def _labels(text: str) -> dict[str, str]:
    """Labels from their JSON, parsed once per distinct text (shared: never mutated)."""
    return json.loads(text)


@dataclass(slots=True)
class _Row:
    """The stats choosing looks at (balancing.WorkerStats), as CANDIDATES returns them.

    A field missing from the hash (a worker registered by an older broker) reads as
    its default."""

    worker_id: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrency: int = 1
    draining: bool = False
    latency_ms: float = 0.0
    latency_at: float = 0.0
    error_rate: float = 0.0
    ejected_until: float = 0.0
    probing: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    version: str = ""

    @classmethod
    def from_row(cls, row: list[str | None]) -> _Row:
        (worker_id, weight, in_flight, max_concurrency, draining, latency_ms, latency_at,
         error_rate, ejected_until, probing, labels, version) = row
        return cls(worker_id or "", float(weight or 1), int(in_flight or 0),
                   int(max_concurrency or 1), draining == "1", float(latency_ms or 0),
                   float(latency_at or 0), float(error_rate or 0), float(ejected_until or 0),
                   probing == "1", _labels(labels) if labels else {}, version or "")


@contextlib.contextmanager
def _unavailable_on_error() -> Iterator[None]:
    """Turn "cannot talk to Redis" into RegistryUnavailable; anything else is a bug and rises."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise RegistryUnavailable(f"Redis unavailable: {exc}") from exc


# ---------------------------------------------------------------------------- registry

class RedisRegistry(Registry):
    """Worker registry shared through Redis by every broker process of a cluster.

    The broker must call :meth:`touch` on every worker heartbeat (a worker not touched
    for ``ttl`` seconds is dead for everyone), and may call :meth:`close` at shutdown.
    Every method raises :class:`RegistryUnavailable` while Redis cannot be reached and
    works again, without any help, once it can.
    """

    def __init__(self, target: RedisTarget | str, *, prefix: str = "dispatch",
                 ttl: float | None = None, rng: random.Random | None = None) -> None:
        """``target``: a URL, or a :class:`RedisTarget` (Sentinel). ``ttl``: seconds of
        silence after which a worker is dead; by default read from the settings at each
        use: HEARTBEAT_INTERVAL x (HEARTBEAT_MISSES + 1), one interval more than the
        owning process itself waits, so that it notices first if it lives."""
        self.target = RedisTarget(url=target) if isinstance(target, str) else target
        self.prefix = prefix
        self._ttl = ttl
        self._rng = rng or random.Random()
        self._p = f"{prefix}:"
        self._beats = f"{prefix}:heartbeats"
        self._seq = f"{prefix}:round-robin"
        self._processes = f"{prefix}:processes"
        self._clients = Clients(self.target, **CLIENT_OPTIONS)

    @property
    def ttl(self) -> float:
        if self._ttl is not None:
            return self._ttl
        return conf.get("HEARTBEAT_INTERVAL") * (conf.get("HEARTBEAT_MISSES") + 1)

    def _key_ttl_ms(self) -> int:
        """Redis TTL of every key: the safety net, twice the worker ttl."""
        return max(1000, int(self.ttl * 2000))

    def _client(self) -> aioredis.Redis:
        return self._clients.get()

    async def close(self) -> None:
        """Close this event loop's connections (at shutdown; at the end of a test)."""
        await self._clients.close()

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run a prelude script: KEYS[1] = heartbeats, ARGV[1] = prefix, ARGV[2] = cutoff."""
        with _unavailable_on_error():
            return await script(keys=[self._beats, *keys],
                                args=[self._p, repr(time.time() - self.ttl), *args],
                                client=self._client())

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._p}worker:{worker_id}"

    # ------------------------------------------------------------------ Registry API

    async def add(self, entry: WorkerEntry) -> WorkerEntry | None:
        """Register (or re-register) ``entry``; its heartbeat time is now."""
        data = _encode(entry)
        data["last_heartbeat"] = now = repr(time.time())
        pairs = [text for item in data.items() for text in item]
        old = await self._run(ADD, [self._worker_key(entry.worker_id)],
                              [entry.worker_id, now, self._key_ttl_ms(), data["commands"],
                               entry.owner, self._claim_ms(), affinity_salt(), entry.schemas,
                               *pairs])
        if old == 0:
            raise WorkerIdTaken(entry.worker_id)
        return _decode(old) if old else None

    async def remove(self, worker_id: str, connection: str) -> WorkerEntry | None:
        old = await self._run(REMOVE, [], [worker_id, connection, self._claim_ms()])
        return _decode(old) if old else None

    async def touch(self, worker_id: str, when: float | None = None) -> bool:
        return bool(await self._run(TOUCH, [], [worker_id, repr(when or time.time()),
                                                self._key_ttl_ms(), self._claim_ms()]))

    def _claim_ms(self) -> int:
        return max(self._key_ttl_ms(), int(conf.get("WORKER_ID_CLAIM_SECONDS") * 1000))

    async def reserve_many(self, wanted: list[Wanted]) -> list[Reservation]:
        """Two round trips for the lot: candidates of every command, then every slot
        (one per request for a named worker).

        Choices within the batch count against each other (a worker chosen once has
        one slot less for the next), as one-at-a-time reserves would.
        """
        out: list[Reservation | None] = [None] * len(wanted)
        open_ = []
        for i, w in enumerate(wanted):
            if w.target is None:
                open_.append(i)
            else:
                got = await self._run(RESERVE, [], [w.target, "", repr(time.time())])
                out[i] = (Reservation(_decode(got), True, "named") if isinstance(got, list)
                          else Reservation(None, got == 1))  # 0: unknown, 1: full
        if open_:
            for i, reservation in zip(open_, await self._reserve_open(
                    [wanted[i] for i in open_])):
                out[i] = reservation
        return out  # type: ignore[return-value]

    async def _reserve_open(self, wanted: list[Wanted], attempts: int = RESERVE_ATTEMPTS,
                            sample: bool = True) -> list[Reservation]:
        """Choose and take a slot for each. Those that lost a race with another process
        (it took the last slot, or the worker left) are tried again together,
        ``attempts`` times in all (after that they count as capable but busy: they
        wait); those whose random sample had no eligible worker, with every worker."""
        seq, pools = await self._candidates(wanted, sample)
        strategy, canaries, now = conf.get("STRATEGY"), canary_rules(), time.time()
        out: list[Reservation | None] = [None] * len(wanted)
        picks: list[tuple[int, Choice]] = []
        unsampled: list[int] = []
        for i, w in enumerate(wanted):
            total, rows = pools[w.command, w.select, w.affinity]
            choice = choose(rows, w, strategy, seq - len(wanted) + 1 + i, self._rng, now,
                            of=total, canaries=canaries)
            if choice.worker is not None:
                choice.worker.in_flight += 1  # counts against the next choice of the batch
                picks.append((i, choice))
            elif total > len(rows):  # a sample: look at them all before saying no
                unsampled.append(i)
            else:
                out[i] = Reservation(None, choice.capable, choice.why, choice.unmatched)
        lost = await self._take(picks, out)
        if lost and attempts > 1:
            await self._again(wanted, lost, out, attempts - 1, sample)
        else:
            for i in lost:
                out[i] = Reservation(None, True, "lost the race for a slot")
        if unsampled:
            await self._again(wanted, unsampled, out, attempts, False)
        return out  # type: ignore[return-value]

    async def _take(self, picks: list[tuple[int, Choice]], out: list[Reservation | None]
                    ) -> list[int]:
        """Take the chosen slots (one round trip); the indices of those lost."""
        if not picks:
            return []
        statuses, flat = await self._run(
            RESERVE_MANY, [], [repr(time.time()), *(text for _, choice in picks
                                                   for text in (choice.worker.worker_id, ""))])
        entries = {worker_id: _decode(h) for worker_id, h in zip(flat[::2], flat[1::2])}
        lost = []
        for (i, choice), status in zip(picks, statuses):
            if status == 2:
                out[i] = Reservation(entries[choice.worker.worker_id], True, choice.why)
            else:
                lost.append(i)
        return lost

    async def _again(self, wanted: list[Wanted], indices: list[int],
                     out: list[Reservation | None], attempts: int, sample: bool) -> None:
        again = await self._reserve_open([wanted[i] for i in indices], attempts, sample)
        for i, reservation in zip(indices, again):
            out[i] = reservation

    async def _candidates(self, wanted: list[Wanted], sample: bool
                          ) -> tuple[int, dict[Pool, tuple[int, list[_Row]]]]:
        """Sequence number of the last of the choices, and per pool (command, selector,
        affinity key) how many live workers are in it and the rows looked at (a sample of
        them, when there are many and every request for it may be served from one; for
        a key, its next workers on the ring, in order)."""
        strategy, canaries = conf.get("STRATEGY"), canary_rules()
        sizes: dict[Pool, int] = {}
        for w in wanted:
            pool = (w.command, w.select, w.affinity)
            size = SAMPLE if sample and samples(strategy, w, canaries) else 0
            if w.affinity is not None and not w.select:  # the next few on the ring
                size = RING_SUCCESSORS if sample else 0
            if pool in sizes:
                # Several choices from one sample: a bigger sample, or all.
                size = sizes[pool] + SAMPLE if size and sizes[pool] else 0
            sizes[pool] = size
        args: list[Any] = [self._key_ttl_ms(), len(wanted), self._rng.getrandbits(31),
                           affinity_salt()]
        for (command, select, affinity), size in sizes.items():
            args += [command, size, json.dumps(select) if select else "", affinity or ""]
        seq, found = await self._run(CANDIDATES, [self._seq], args)
        pools = {}
        for (command, select, affinity), (total, rows) in zip(sizes, found):
            rows = [_Row.from_row(row) for row in rows]
            if affinity is not None and select:  # the ring is the command's: rendezvous
                rows = by_affinity(rows, affinity, affinity_salt())
            pools[command, select, affinity] = (int(total), rows)
        return int(seq), pools

    async def explain(self, wanted: Wanted) -> tuple[Reservation, list[WorkerEntry]]:
        """Chosen from every worker (no sample), with their full entries."""
        entries = [e for e in await self.all()
                   if (e.worker_id == wanted.target if wanted.target is not None
                       else wanted.command in e.commands)]
        if wanted.affinity is not None:  # in the key's order, as a reservation sees them
            salt = affinity_salt()
            entries = by_affinity(entries, wanted.affinity, salt) if wanted.select else \
                Ring(entries, salt).successors(wanted.affinity, len(entries))  # type: ignore
        choice = choose(entries, wanted, conf.get("STRATEGY"), 0, self._rng, time.time(),
                        canaries=canary_rules())
        return Reservation(choice.worker, choice.capable, choice.why, choice.unmatched), entries

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        await self.release_many([(worker_id, latency_ms, health)])

    async def release_many(self, outcomes: list[Outcome]) -> None:
        """One round trip, however many; one more per worker to eject."""
        if not outcomes:
            return
        now = time.time()
        args = [repr(balancing.EWMA_ALPHA), repr(now), repr(balancing.UNMEASURED_LATENCY_MS),
                repr(balancing.LATENCY_DECAY_SECONDS), repr(balancing.PEAK_STEP)]
        for _, latency_ms, health in outcomes:
            args += ["" if latency_ms is None else repr(float(latency_ms)), health.value]
        with _unavailable_on_error():
            found = await RELEASE(keys=[self._worker_key(w) for w, _, _ in outcomes],
                                  args=args, client=self._client())
        after = conf.get("EJECT_AFTER")
        due = {worker_id: int(row[0]) for (worker_id, _, health), row in zip(outcomes, found)
               if row and ejection_due(int(row[0]), row[1] == "1", health, after,
                                       float(row[2]), now)}
        for worker_id, failures in due.items():
            await self._eject(worker_id, failures, now)

    async def _eject(self, worker_id: str, failures: int, now: float) -> None:
        why = ejection_reason(failures)
        until = await self._run(EJECT, [], [
            worker_id, why, repr(conf.get("EJECT_SECONDS")), repr(conf.get("EJECT_MAX_SECONDS")),
            repr(conf.get("EJECT_MAX_SHARE")), repr(now)])
        if until != -1:  # -1: it is gone
            log_ejection(worker_id, failures, None if until == 0 else float(until), why)

    async def set_draining(self, worker_id: str, draining: bool) -> bool:
        return bool(await self._run(SET_DRAINING, [], [worker_id, "1" if draining else "0"]))

    async def get(self, worker_id: str) -> WorkerEntry | None:
        found = await self._run(GET, [], [worker_id])
        return _decode(found) if found else None

    async def all(self) -> list[WorkerEntry]:
        """Every live worker, oldest connection first (as MemoryRegistry lists them)."""
        entries = [_decode(h) for h in await self._run(ALL, [], [])]
        return sorted(entries, key=lambda e: (e.connected_at, e.worker_id))

    async def count(self) -> int:
        return int(await self._run(COUNT, [], []))

    async def described(self) -> list[WorkerEntry]:
        """:meth:`all`, and one more round trip for their schemas."""
        entries = await self.all()
        if entries:
            with _unavailable_on_error():
                texts = await self._client().mget(
                    [f"{self._p}schemas:{e.worker_id}" for e in entries])
            for entry, text in zip(entries, texts):
                entry.schemas = text or ""
        return entries

    async def connections(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """One round trip, however many ids."""
        flat = await self._run(CONNECTIONS, [], list(set(worker_ids)))
        return dict(zip(flat[::2], flat[1::2]))

    # ------------------------------------------------------------------ broker processes

    async def process_alive(self, process: str, ttl: float | None = None) -> None:
        """Declare ``process`` alive for ``ttl`` more seconds (default: the worker ttl).

        Called every heartbeat interval (:mod:`dispatch.liveness`); :meth:`live_processes`
        then tells which broker processes of the cluster are running.
        """
        ttl = self.ttl if ttl is None else ttl
        with _unavailable_on_error():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.zadd(self._processes, {process: time.time() + ttl})
                pipe.pexpire(self._processes, max(self._key_ttl_ms(), int(ttl * 2000)))
                await pipe.execute()

    async def process_gone(self, process: str) -> None:
        """Say goodbye at a clean shutdown, so that others need not wait for the ttl."""
        with _unavailable_on_error():
            await self._client().zrem(self._processes, process)

    async def live_processes(self) -> set[str]:
        """Names of the broker processes whose last :meth:`process_alive` has not run out."""
        with _unavailable_on_error():
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._processes, "-inf", f"({time.time()!r}")
                pipe.zrange(self._processes, 0, -1)
                _, names = await pipe.execute()
        return set(names)
