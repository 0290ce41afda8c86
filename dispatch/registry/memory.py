"""The registry of one process: plain dictionaries, no awaits that yield."""

from __future__ import annotations

import random
import time

from .. import conf
from ..core.balancing import get_strategy
from .base import EWMA_ALPHA, Registry, Reservation, WorkerEntry, WorkerIdTaken


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
        self._by_command: dict[str, dict[str, WorkerEntry]] = {}
        self._claims: dict[str, tuple[str, float]] = {}  # id that left -> (owner, until)
        self._seq = 0
        self._rng = rng or random.Random()

    async def add(self, entry: WorkerEntry) -> WorkerEntry | None:
        live = self._workers.get(entry.worker_id)
        owner, until = (live.owner, float("inf")) if live is not None else \
            self._claims.get(entry.worker_id, ("", 0.0))
        if owner and owner != entry.owner and until > time.time():
            raise WorkerIdTaken(entry.worker_id)
        self._claims.pop(entry.worker_id, None)
        old = self._drop(entry.worker_id)
        self._workers[entry.worker_id] = entry
        for command in entry.commands:
            self._by_command.setdefault(command, {})[entry.worker_id] = entry
        return old

    async def remove(self, worker_id: str, channel: str) -> WorkerEntry | None:
        entry = self._workers.get(worker_id)
        if entry is None or entry.channel != channel:
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
        self._claims[entry.worker_id] = (entry.owner,
                                         now + conf.get("WORKER_ID_CLAIM_SECONDS"))

    def _drop(self, worker_id: str) -> WorkerEntry | None:
        entry = self._workers.pop(worker_id, None)
        if entry is not None:
            for command in entry.commands:
                offering = self._by_command.get(command)
                if offering is not None:
                    offering.pop(worker_id, None)
                    if not offering:
                        del self._by_command[command]
        return entry

    async def touch(self, worker_id: str, when: float | None = None) -> bool:
        entry = self._workers.get(worker_id)
        if entry is not None:
            entry.last_heartbeat = when or time.time()
        return entry is not None

    async def reserve(self, command: str, *, worker_id: str | None = None) -> Reservation:
        if worker_id is not None:
            entry = self._workers.get(worker_id)
            if entry is None:
                return Reservation(None, False)
            if not entry.has_room():
                return Reservation(None, True)
            entry.in_flight += 1
            return Reservation(entry, True)
        offering = self._by_command.get(command)
        if not offering:
            return Reservation(None, False)
        candidates = [w for w in offering.values() if w.has_room()]
        if not candidates:
            return Reservation(None, True)
        self._seq += 1
        chosen = get_strategy(conf.get("STRATEGY"))(candidates, self._seq, self._rng)
        chosen.in_flight += 1
        return Reservation(chosen, True)  # type: ignore[arg-type]

    async def release(self, worker_id: str, *, latency_ms: float | None, ok: bool) -> None:
        entry = self._workers.get(worker_id)
        if entry is None:
            return
        entry.in_flight = max(0, entry.in_flight - 1)
        if ok:
            entry.completed += 1
        else:
            entry.errors += 1
        entry.error_rate += EWMA_ALPHA * ((0.0 if ok else 1.0) - entry.error_rate)
        if latency_ms is not None:
            entry.latency_ms = (latency_ms if entry.completed + entry.errors == 1
                                else entry.latency_ms + EWMA_ALPHA * (latency_ms - entry.latency_ms))

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
