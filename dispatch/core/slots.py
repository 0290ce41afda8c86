"""Worker slots for the request table: reserving, giving back, the queue, the sweep.

One code path for both registries: with a shared (Redis) registry, reservations and
releases of one moment go together (one round trip for all), with the in-process one
they run at once. Requests that found every capable worker full wait in the table's
queue; :meth:`Slots.serve_queue` tries them again whenever a slot may have freed (and
every poll, since a slot can free in another process).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Iterable

from workers import protocol
from workers.protocol import ErrorCode

from .. import conf
from ..balancing import Health, Wanted
from ..errors import RegistryUnavailable
from ..loops import Batcher
from ..registry import Outcome, Registry
from .requests import Action, Request, RequestTable, State

log = logging.getLogger("dispatch.slots")

#: How often requests waiting for a free slot are retried when nothing wakes them.
QUEUE_POLL_SECONDS = 0.05

Perform = Callable[[list[Action]], Awaitable[None]]


class Slots:
    """Reserves and releases worker slots for one process's request table."""

    def __init__(self, registry: Registry, table: RequestTable, perform: Perform) -> None:
        self.registry = registry
        self.table = table
        self._perform = perform
        self._intake: Batcher[Request] = Batcher(self._reserve, "dispatch-reserve")
        self._releases: Batcher[Outcome] = Batcher(self._release_many, "dispatch-release")
        self._wake = asyncio.Event()

    async def reserve(self, requests: list[Request]) -> None:
        """Reserve a slot for each (the table is told how it went)."""
        if self.registry.local:
            await self._reserve(requests)
        else:  # with the others of this moment, in one round trip for all
            for request in requests:
                self._intake.add(request)

    async def _reserve(self, batch: list[Request]) -> None:
        try:
            reservations = await self.registry.reserve_many([r.wanted() for r in batch])
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, each gets an answer
            self.table.stats["registry_errors"] += 1
            if not isinstance(exc, RegistryUnavailable):  # a defect: say where
                log.exception("could not reserve workers for %d request(s)", len(batch))
            await self._perform(self.table.give_up(
                batch, f"{protocol.BROKER_UNAVAILABLE}: {exc}", ErrorCode.BROKER_UNAVAILABLE))
            return
        now = asyncio.get_running_loop().time()
        for request, reservation in zip(batch, reservations):
            await self._perform(self.table.reserved(request, reservation, now))

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        """Give back a worker's slot: at once in-process, in a batch on a shared registry.

        Raises :class:`RegistryUnavailable` only in the first case; a batch that
        cannot be given back is logged (the slots come back with the worker's entry).
        """
        if self.registry.local:
            await self.registry.release(worker_id, latency_ms=latency_ms, health=health)
            self.slot_freed()
        else:
            self._releases.add((worker_id, latency_ms, health))

    async def give_back(self, worker_id: str) -> None:
        """Release a slot taken for a request that never reached its worker."""
        try:
            await self.release(worker_id, latency_ms=None, health=Health.UNKNOWN)
        except RegistryUnavailable:
            self.table.stats["registry_errors"] += 1  # it expires with the heartbeat

    async def _release_many(self, outcomes: list[Outcome]) -> None:
        try:
            await self.registry.release_many(outcomes)
        except RegistryUnavailable as exc:
            self.table.stats["registry_errors"] += 1
            log.warning("could not give back %d worker slot(s): %s", len(outcomes), exc)
        self.slot_freed()

    # ------------------------------------------------------------------ the queue

    def slot_freed(self) -> None:
        """A worker slot may have freed (or a worker came): serve the queue now."""
        if self.table.waiting:
            self._wake.set()

    def wake(self) -> None:
        """Requests were queued: serve the queue."""
        self._wake.set()

    async def serve_queue(self) -> None:
        """Retry queued requests when a slot frees (or every poll, across processes)."""
        while True:
            if self.table.waiting:
                try:
                    await asyncio.wait_for(self._wake.wait(), QUEUE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            batch = self.table.take_waiting()
            try:
                if batch:
                    await self._queue_pass(batch)
            finally:
                self.table.end_pass()  # those that must wait again, back in front
            # Cleared after the pass, so that re-queueing above does not spin the loop;
            # a wake-up lost here costs at most one poll interval.
            self._wake.clear()

    async def _queue_pass(self, batch: list[Request]) -> None:
        """Reserve for the waiting, alike ones (same command and routing) in turn: the
        first of each kind, then the next of each kind that got a slot, and so on. A
        kind whose first finds no slot is not tried further in this pass, so a full
        fleet costs a choice per kind of request, not one per waiting request."""
        longest = conf.get("QUEUE_MAX_WAIT")
        since = asyncio.get_running_loop().time() - longest
        overdue = [r for r in batch if max(r.opened, r.not_before) < since] if longest else []
        if overdue:  # a place in the queue is not for ever: others may be waiting for it
            await self._perform(self.table.give_up(
                overdue, f"{protocol.ALL_BUSY}: waited {longest:g} s for a free worker "
                "(QUEUE_MAX_WAIT)", ErrorCode.ALL_BUSY))
        # Alike includes patience: one that waits for a worker to come must not hold
        # up one that is answered no_workers when none offers its command.
        now = asyncio.get_running_loop().time()
        kinds: dict[tuple[Wanted, bool], deque[Request]] = {}
        for request in batch:
            if request.state is not State.RESERVING:
                continue
            kinds.setdefault((request.wanted(), request.patient_until > now),
                             deque()).append(request)
        while kinds:
            heads = [alike.popleft() for alike in kinds.values()]
            await self._reserve(heads)
            for head, (kind, alike) in zip(heads, list(kinds.items())):
                if head.state is State.WAITING or not alike:  # no slot: the rest wait too
                    self.table.untried(alike)
                    del kinds[kind]

    # ------------------------------------------------------------------ the sweep

    async def sweep(self) -> None:
        """Hand back requests whose worker vanished without a word.

        A worker socket reports the requests it held when it closes; but if its whole
        broker process dies, nobody does. Its workers then drop out of the shared
        registry when their heartbeats expire, and this notices.
        """
        placed = self.table.placed()
        if not placed:
            return
        live = await self.registry.connections(
            p.worker_id for r in placed for p in r.placements)
        for request in placed:
            for p in vanished(request, live):
                await self._perform(self.table.lost(request.key, p, "worker vanished"))


def vanished(request: Request, live: dict[str, str]) -> Iterable[str]:
    """The workers of ``request`` no longer registered on the connection it was sent to."""
    return [p.worker_id for p in list(request.placements)
            if not p.awaited and live.get(p.worker_id) != p.connection]
