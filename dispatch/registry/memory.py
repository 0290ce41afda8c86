"""The registry of one process: plain dictionaries, no awaits that yield."""

from __future__ import annotations

import random
import time

from .. import conf
from ..balancing import (SAMPLE, Choice, Health, Ring, Wanted, by_affinity, choose, matches,
                         samples)
from ..errors import WorkerIdTaken
from .base import (Registry, Reservation, Standing, WorkerEntry, affinity_salt,
                   canary_rules, ejection_reason, log_ejection)


class MemoryRegistry(Registry):
    """The registry of one process: plain dictionaries, no awaits that yield.

    Every method finishes without suspending, so on one event loop each call is
    atomic by construction: that is what makes choose-and-reserve safe here.
    """

    local = True

    #: Claims of ids that left, kept at most (oldest first out beyond it).
    MAX_CLAIMS = 100_000

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        self._pools: dict[str, list[WorkerEntry]] = {}  # command -> its workers
        self._rings: dict[str, Ring] = {}  # command -> its affinity ring, once used
        #: (label, value) -> the workers with it, by id: a selector looks at those only
        self._labelled: dict[tuple[str, str], dict[str, WorkerEntry]] = {}
        #: id that left -> (owner, until when, its standing)
        self._claims: dict[str, tuple[str, float, Standing]] = {}
        self._seq = 0
        self._rng = rng or random.Random()

    async def add(self, entry: WorkerEntry) -> WorkerEntry | None:
        live = self._workers.get(entry.worker_id)
        owner, until, standing = (live.owner, float("inf"), live.standing()) \
            if live is not None else self._claims.get(entry.worker_id, ("", 0.0, Standing()))
        now = time.time()
        if owner and owner != entry.owner and until > now:
            raise WorkerIdTaken(entry.worker_id)
        self._claims.pop(entry.worker_id, None)
        if until > now:
            entry.inherit(standing, now)
        old = self._drop(entry.worker_id)
        self._workers[entry.worker_id] = entry
        for command in entry.commands:
            self._pools.setdefault(command, []).append(entry)
            if command in self._rings:
                self._rings[command].add(entry)
        for pair in entry.labels.items():
            self._labelled.setdefault(pair, {})[entry.worker_id] = entry
        return old

    async def remove(self, worker_id: str, connection: str) -> WorkerEntry | None:
        entry = self._workers.get(worker_id)
        if entry is None or entry.connection != connection:
            return None
        self._claim(entry)
        return self._drop(worker_id)

    def _claim(self, entry: WorkerEntry) -> None:
        """Keep a leaving worker's id for its owner a while."""
        now = time.time()
        if len(self._claims) >= self.MAX_CLAIMS:
            self._claims = {k: v for k, v in self._claims.items() if v[1] > now}
            while len(self._claims) >= self.MAX_CLAIMS:
                del self._claims[next(iter(self._claims))]
        self._claims[entry.worker_id] = (entry.owner, now + conf.get("WORKER_ID_CLAIM_SECONDS"),
                                         entry.standing())

    def _drop(self, worker_id: str) -> WorkerEntry | None:
        entry = self._workers.pop(worker_id, None)
        if entry is not None:
            for command in entry.commands:
                if command in self._rings:
                    self._rings[command].remove(entry)
                pool = self._pools.get(command)
                if pool is not None:
                    # By identity (entries compare by value), and O(pool): leaving is
                    # rare beside choosing.
                    del pool[next(i for i, e in enumerate(pool) if e is entry)]
                    if not pool:
                        del self._pools[command]
                        self._rings.pop(command, None)
            for pair in entry.labels.items():
                same = self._labelled.get(pair)
                if same is not None:
                    same.pop(worker_id, None)
                    if not same:
                        del self._labelled[pair]
        return entry

    async def touch(self, worker_id: str, when: float | None = None) -> bool:
        entry = self._workers.get(worker_id)
        if entry is not None:
            entry.last_heartbeat = when or time.time()
        return entry is not None

    async def reserve_many(self, wanted: list[Wanted]) -> list[Reservation]:
        return [self._reserve(w) for w in wanted]

    def _reserve(self, wanted: Wanted) -> Reservation:
        choice = self._choose(wanted, time.time())
        if choice.worker is None:
            return Reservation(None, choice.capable, choice.why, choice.unmatched)
        choice.worker.in_flight += 1
        return Reservation(choice.worker, True, choice.why)

    def _choose(self, wanted: Wanted, now: float) -> Choice:
        strategy = conf.get("STRATEGY")
        canaries = canary_rules()
        if wanted.target is not None:
            entry = self._workers.get(wanted.target)
            pool: list[WorkerEntry] = [entry] if entry is not None else []
            of = len(pool)
        elif wanted.affinity is not None:
            pool, of = self._affine(wanted), len(self._pools.get(wanted.command, ()))
        else:
            pool = self._matching(wanted) if wanted.select else \
                self._pools.get(wanted.command, [])
            of = len(pool)
            if of > SAMPLE and samples(strategy, wanted, canaries):
                sample = self._rng.sample(pool, SAMPLE)
                self._seq += 1
                choice = choose(sample, wanted, strategy, self._seq, self._rng, now, of=of,
                                canaries=canaries)
                if choice.worker is not None:
                    return choice  # else look at them all: full, or nearly all full
        self._seq += 1
        return choose(pool, wanted, strategy, self._seq, self._rng, now, of=of,
                      canaries=canaries)

    def _affine(self, wanted: Wanted) -> list[WorkerEntry]:
        """The workers an affinity key prefers, in order: the next few on the command's
        ring, or, with a selector, the matching workers by rendezvous."""
        if wanted.select:
            return by_affinity(self._matching(wanted), wanted.affinity,  # type: ignore
                               affinity_salt())
        pool = self._pools.get(wanted.command)
        if not pool:
            return []
        ring = self._rings.get(wanted.command)
        if ring is None:  # built on first use, then kept up to date by add and remove
            ring = self._rings[wanted.command] = Ring(pool, affinity_salt())
        return ring.successors(wanted.affinity)  # type: ignore[arg-type]

    def _matching(self, wanted: Wanted) -> list[WorkerEntry]:
        """The workers offering the command that have every label of the selector,
        found from the rarest of those labels: no scan of the whole fleet."""
        sets = [self._labelled.get(pair) for pair in wanted.select]
        if all(sets):
            rarest = min(sets, key=len)  # type: ignore[arg-type]
            found = [e for e in rarest.values()  # type: ignore[union-attr]
                     if wanted.command in e.commands and matches(e, wanted.select)]
            if found:
                return found
        # No worker offering the command has the labels: show choose() the command's
        # workers, so that it can say which selector matched nobody (a sample will do).
        pool = self._pools.get(wanted.command, [])
        return pool if len(pool) <= SAMPLE else self._rng.sample(pool, SAMPLE)

    async def explain(self, wanted: Wanted) -> tuple[Reservation, list[WorkerEntry]]:
        choice = self._choose(wanted, time.time())
        pool = ([self._workers[wanted.target]] if wanted.target in self._workers else []) \
            if wanted.target is not None else list(self._pools.get(wanted.command, []))
        return Reservation(choice.worker, choice.capable, choice.why, choice.unmatched), pool

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        entry = self._workers.get(worker_id)
        if entry is None:
            return
        now = time.time()
        if entry.record(latency_ms, health, now):
            self._eject(entry, now)

    def _eject(self, entry: WorkerEntry, now: float) -> None:
        """Out of rotation, unless that would put too much of the workers offering one
        of its commands out (idle workers of other commands do not make room)."""
        why = ejection_reason(entry.failures)
        share = conf.get("EJECT_MAX_SHARE")
        if any(sum(w.ejected_until > now for w in self._pools.get(command, ())) + 1
               > share * len(self._pools.get(command, ())) for command in entry.commands):
            log_ejection(entry.worker_id, entry.failures, None, why)
            return
        entry.eject(now, why)
        log_ejection(entry.worker_id, entry.failures, entry.ejected_until, why)

    async def set_draining(self, worker_id: str, draining: bool) -> bool:
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        entry.draining = draining
        return True

    async def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    async def all(self) -> list[WorkerEntry]:
        return list(self._workers.values())

    async def count(self) -> int:
        return len(self._workers)
