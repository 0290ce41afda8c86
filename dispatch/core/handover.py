"""A stopping process hands its requests over instead of failing them.

With the job store, SIGTERM does not wait for work in flight, nor answer it with an
error: the process freezes its requests (answers, progress and chunks that come for
them wait; a worker that leaves is no news, its job stays with it), commits the
store, and asks the others to take its unanswered rows over (:class:`Gone`). The
one that does says so to all (:class:`Moved`): from then on answers for those
requests go there, and what waited here is passed on. Alone (the embedded
default), the rows wait in the store for the next start.
"""

from __future__ import annotations

import asyncio
import logging

from workers import protocol

from .events import Chunk, Event, Gone, Lost, Moved, Progress, Reply
from .exchange import Exchange
from .store import JobStore

log = logging.getLogger("dispatch.handover")

#: Seconds a stopping process waits for another to take its requests over.
GONE_WAIT = 3.0
#: Seconds it gives the others to read that it goes, before its workers leave (they
#: then wait for the workers instead of answering no_workers).
GONE_HEARD = 0.2


class Handover:
    """One process's giving away of its requests, when it stops."""

    def __init__(self, exchange: Exchange, process: str) -> None:
        self.exchange = exchange
        self.process = process
        self._waiting: list[Event] = []  # frozen events, for whoever takes over
        self._to: str | None = None  # the inbox of the process that took over
        self._moved = asyncio.Event()

    def freeze(self) -> None:
        """From now on, events about this process's requests wait (or go to the taker)."""
        for kind in (Reply, Progress, Chunk):
            self.exchange.on(kind, self._hold)
        self.exchange.on(Lost, self._no_news)

    async def give_away(self, store: JobStore, alone: bool) -> None:
        """Commit; unless ``alone``, say so to the others (its workers are on their way to
        them) and have one take the rows over, if it holds any (else nobody answers, and
        the stop would wait GONE_WAIT for nothing)."""
        await store.flush()
        if alone:
            return
        holding = self.process in await store.holders()
        await self.exchange.broadcast(Gone(self.process, self.exchange.inbox,
                                           protocol.new_id()))
        await asyncio.sleep(GONE_HEARD)  # before its workers leave, the others know why
        if not holding:
            return
        try:
            async with asyncio.timeout(GONE_WAIT):
                await self._moved.wait()
        except TimeoutError:
            log.warning("no other process took this one's requests over within %.0f s: "
                        "they wait in the job store for one that starts", GONE_WAIT)

    def moved(self, event: Moved) -> None:
        """Another process took this one's requests over: what waits goes there."""
        if event.old != self.exchange.inbox or self._to is not None:
            return
        self._to = event.new
        self._moved.set()
        waiting, self._waiting = self._waiting, []
        for held in waiting:
            asyncio.ensure_future(self.exchange.deliver(event.new, held))
        log.info("requests handed over to the process at %s", event.new)

    async def _hold(self, event: Event) -> None:
        if self._to is not None:
            await self.exchange.deliver(self._to, event)
        else:
            self._waiting.append(event)

    async def _no_news(self, event: Lost) -> None:
        """A worker left while this process stops (it was sent away): its job goes on."""
