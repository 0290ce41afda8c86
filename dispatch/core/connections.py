"""The worker connections of this process, and what other processes ask of them.

Worker sockets have no channel of their own on the layer: an event for one (a
forward, a cancel, a chunk's acknowledgement, a close) comes to the process's inbox
and is handed to its link here, by the connection's name. This is also the
:class:`~.links.LinkHost` the links talk to, so that they see the registry, the
other processes' inboxes and the slots, and nothing else of the process.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Awaitable, Callable

from workers import protocol

from .. import conf
from ..balancing import Health
from ..registry import Registry, WorkerEntry
from . import links
from .events import (Adopt, Adopted, Cancel, ChunkAck, CloseWorker, Event, Forward, Lost,
                     Moved, Notify, Reply)
from .exchange import Exchange
from .links import WorkerLink
from .liveness import takeover_seconds
from .sent import KEEP_SECONDS, SentReplies
from .slots import Slots

Adopter = Callable[[WorkerEntry, list[str]], Awaitable[list[Forward]]]


class WorkerConnections:
    """Every worker connection of one process, registered or not."""

    def __init__(self, exchange: Exchange, slots: Slots, registry: Registry, process: str,
                 stats: Counter[str]) -> None:
        self.exchange = exchange
        self.slots = slots
        self.registry = registry
        self.process = process
        self.stats = stats
        #: Of the requests that ran on a worker before a restart, those it reports on
        #: registering (set by the dispatcher): the forwards it holds again.
        self.adopter: Adopter | None = None
        self.links: set[WorkerLink] = set()  # every worker connection, registered or not
        self.by_name: dict[str, WorkerLink] = {}  # the registered, by connection name
        #: Told when another process takes over one's requests (a stopping one listens).
        self.on_moved: Callable[[Moved], None] | None = None
        #: Answers passed to other processes lately: for whoever takes over from one
        #: that died before it read them (with the job store).
        self.sent = SentReplies(max(KEEP_SECONDS, takeover_seconds() + 30)) \
            if conf.get("JOB_STORE") else None
        for kind, handler in ((Forward, self._on_forward), (Cancel, self._on_cancel),
                              (ChunkAck, self._on_chunk_ack), (Notify, self._on_notify),
                              (CloseWorker, self._on_close), (Adopt, self._on_adopt),
                              (Moved, self._on_moved)):
            exchange.on(kind, handler)  # type: ignore[arg-type]

    @property
    def inbox(self) -> str:
        return self.exchange.inbox

    @property
    def busy(self) -> int:
        """Requests the registered workers of this process hold (for any process)."""
        return sum(len(link.held) for link in self.by_name.values())

    def watch(self) -> asyncio.Task[None]:
        """The task that checks every link's liveness."""
        return asyncio.create_task(links.watch(self.links), name="dispatch-watch")

    # ------------------------------------------------------------------ as the links' host

    def add(self, link: WorkerLink) -> None:
        """A new worker connection, checked by the watch from now on."""
        self.links.add(link)

    def registered(self, link: WorkerLink) -> None:
        self.by_name[link.connection] = link

    def forget(self, link: WorkerLink) -> None:
        self.links.discard(link)
        self.by_name.pop(link.connection, None)

    async def deliver(self, to: str, event: Event) -> None:
        if self.sent is not None and isinstance(event, Reply) and to != self.inbox:
            self.sent.keep(event)
        await self.exchange.deliver(to, event)

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        await self.slots.release(worker_id, latency_ms=latency_ms, health=health)

    def slot_freed(self) -> None:
        self.slots.slot_freed()

    async def adopt(self, entry: WorkerEntry, reported: list[str]) -> list[Forward]:
        return [] if self.adopter is None else await self.adopter(entry, reported)

    # ------------------------------------------------------------------ leaving

    async def stop_taking_work(self) -> None:
        """Every registered worker out of rotation: what they hold still finishes."""
        for link in list(self.by_name.values()):
            await link.stop_taking_work()

    async def send_away(self) -> None:
        """Tell every worker the broker is leaving, and when to come back: spread so
        that the fleet returns at RECONNECT_RATE registrations a second, not all in the
        first one."""
        leaving = list(self.by_name.values())
        spread = len(leaving) / conf.get("RECONNECT_RATE")
        for link in leaving:
            await link.leave(protocol.SHUTTING_DOWN, round(random.uniform(0, spread), 2))

    # ------------------------------------------------------------------ events

    async def _on_forward(self, event: Forward) -> None:
        """A request chosen for a worker of this process (by this one or another)."""
        link = self.by_name.get(event.connection)
        if link is not None:
            await link.assign(event)
        else:  # it left after it was chosen: the requester's process tries another
            await self.exchange.deliver(event.reply_to, Lost(event.key, event.worker_id,
                                                             "connection closed"))

    async def _on_cancel(self, event: Cancel) -> None:
        link = self.by_name.get(event.connection)
        if link is not None:
            await link.cancel(event.key, event.reason)

    async def _on_chunk_ack(self, event: ChunkAck) -> None:
        link = self.by_name.get(event.connection)
        if link is not None:
            await link.chunk_acked(event.key, event.seq)

    async def _on_notify(self, event: Notify) -> None:
        for link in list(self.by_name.values()):
            await link.notify(event.message, event.extra)

    async def _on_adopt(self, event: Adopt) -> None:
        link = self.by_name.get(event.connection)
        held = link is not None and await link.adopt(event)
        answered = None if held or self.sent is None else self.sent.take(event.key)
        await self.exchange.deliver(event.reply_to, Adopted(
            event.key, event.worker_id, event.connection, self.inbox,
            held or answered is not None))
        if answered is not None:  # it finished, and its answer went to a process now gone
            await self.deliver(event.reply_to, answered)

    async def _on_moved(self, event: Moved) -> None:
        for link in self.by_name.values():
            link.held.moved(event.old, event.new)
        if self.on_moved is not None:
            self.on_moved(event)

    async def _on_close(self, event: CloseWorker) -> None:
        link = self.by_name.get(event.connection)
        if link is not None:
            await link.close(event.code, event.reason, tell=True)
