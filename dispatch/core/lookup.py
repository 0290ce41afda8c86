"""Requests by their id, wherever they are: here, in another process, or finished.

A requester may cancel or attach to a request from any connection, on any process
of a cluster (its first connection may have dropped, or landed on another process).
So each of these looks in this process's table first, then in the kept answers,
then asks every process (:meth:`~.exchange.Exchange.ask_all`); a process holding
the request answers an attach by sending its events and answer to the asker
(:class:`RemoteSink`), which passes them to its watcher.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from workers import protocol

from ..errors import RegistryUnavailable
from .events import Ask, AskKind, Asked, Watched
from .exchange import Exchange
from .requests import Action, Answer, Request, RequestTable, Sink

log = logging.getLogger("dispatch.lookup")

Perform = Callable[[list[Action]], Awaitable[None]]
#: The answer kept for a request of an owner, if it finished lately.
KeptAnswer = Callable[[str, str], Awaitable["str | None"]]


class Lookup:
    """Cancel, attach, status and sending again, by request id, across the processes of
    a cluster."""

    def __init__(self, exchange: Exchange, table: RequestTable, kept: KeptAnswer,
                 recent: KeptAnswer, perform: Perform, alone: bool) -> None:
        self.exchange = exchange
        self.table = table
        self.kept = kept  # any kept answer, the database's too
        self.recent = recent  # a quick look: memory, or Redis
        self._perform = perform
        self.alone = alone  # no other process can hold a request (the in-process registry)
        #: Requests of other processes this one is attached to: its key -> the watcher.
        self.attached: dict[str, Sink] = {}
        #: Attached to a request the job store holds for a process that died, before any
        #: process took it over: (owner, request id) -> (watcher, stream), until this one
        #: does (:meth:`restored`). A requester that came back thus waits for it rather
        #: than sending it again (which would run it twice).
        self.waiting: dict[tuple[str, str], tuple[Sink, bool]] = {}
        #: Whether the job store holds an unanswered request of an owner (set when there
        #: is a store).
        self.stored: Callable[[str, str], Awaitable[bool]] | None = None
        exchange.on(Ask, self._on_ask)
        exchange.on(Watched, self._on_watched)

    def unwatch(self, sink: Sink) -> None:
        """The watcher left: stop passing on what other processes send for it."""
        for key in [k for k, s in self.attached.items() if s is sink]:
            del self.attached[key]
        for name in [n for n, (s, _) in self.waiting.items() if s is sink]:
            del self.waiting[name]

    def restored(self, request: Request) -> None:
        """A request taken over from the job store: whoever waited for it watches it."""
        waiting = self.waiting.pop((request.owner, request.request_id), None)
        if waiting is not None:
            self.table.watch(request.key, *waiting)

    async def look_again(self) -> None:
        """Each liveness round, the attaches that wait for a request of a process that
        died look for it again: another process may have taken it over (it tells only
        its own), or it finished meanwhile (its answer is kept)."""
        waiting, self.waiting = self.waiting, {}
        await asyncio.gather(*(self._look_again(owner, request_id, sink, stream)
                               for (owner, request_id), (sink, stream) in waiting.items()))

    async def _look_again(self, owner: str, request_id: str, sink: Sink, stream: bool
                          ) -> None:
        if not await self.attach(owner, request_id, sink, stream):
            unknown = protocol.ApiResponse.failure(
                request_id, f"No request '{protocol.quote(request_id)}' of yours is "
                "running or finished lately", protocol.ErrorCode.UNKNOWN_REQUEST)
            await sink.answer(unknown, unknown.to_json())

    async def cancel(self, owner: str | None, request_id: str, reason: str) -> int:
        """Cancel the requests of ``owner`` (None: anyone's) with this id, in whichever
        process holds them; returns how many were found."""
        found = self._cancel_here(owner, request_id, reason)
        if found:
            await self._perform(found)
            return 1
        if self.alone:
            return 0
        return await self.exchange.ask_all(AskKind.CANCEL, owner, request_id, reason=reason)

    def _cancel_here(self, owner: str | None, request_id: str, reason: str) -> list[Action]:
        return [a for r in self.table.find(owner, request_id)
                for a in self.table.cancel(r.key, reason)]

    async def attach(self, owner: str, request_id: str, sink: Sink, stream: bool) -> bool:
        """Watch a request of ``owner``: running here or elsewhere (its remaining progress
        and its answer), or finished lately (its kept answer). False: unknown."""
        for request in self.table.find(owner, request_id):
            return self.table.watch(request.key, sink, stream)
        if await self._kept(owner, request_id, sink):
            return True
        if self.alone:
            return False
        key = protocol.new_id()
        self.attached[key] = sink
        if await self.exchange.ask_all(AskKind.ATTACH, owner, request_id, first=True,
                                       key=key, stream=stream):
            return True
        del self.attached[key]
        if await self._kept(owner, request_id, sink):  # it finished meanwhile
            return True
        if self.stored is not None and await self.stored(owner, request_id):
            self.waiting[(owner, request_id)] = (sink, stream)  # its process died
            return True
        return False

    async def _kept(self, owner: str, request_id: str, sink: Sink) -> bool:
        """Its kept answer to ``sink``, if it finished lately."""
        kept = await self.kept(owner, request_id)
        if kept is None:
            return False
        await sink.answer(protocol.ApiResponse.from_json(kept), kept)
        return True

    async def rejoin(self, owner: str, request_id: str, sink: Sink, stream: bool) -> bool:
        """A request sent again with an id ``owner`` used lately: ``sink`` watches the
        one running here, or gets its kept answer (memory, or Redis in a cluster); False
        if there is none (a new request, then). Not asked of other processes, nor of
        the database: this is on every request's path."""
        for request in self.table.find(owner, request_id):
            return self.table.watch(request.key, sink, stream)
        try:
            kept = await self.recent(owner, request_id)
        except RegistryUnavailable:  # Redis down: it is taken for a new request
            return False
        if kept is None:
            return False
        await sink.answer(protocol.ApiResponse.from_json(kept), kept)
        return True

    async def status(self, owner: str, request_id: str) -> str | None:
        """"running" (here or in another process), the kept answer (JSON text), or None."""
        if self.table.find(owner, request_id):
            return "running"
        kept = await self.kept(owner, request_id)
        if kept is not None:
            return kept
        if not self.alone and await self.exchange.ask_all(AskKind.STATUS, owner, request_id,
                                                          first=True):
            return "running"
        return None

    # ------------------------------------------------------------------ events

    async def _on_ask(self, ask: Ask) -> None:
        """Another process (or this one) asks about a request by its id."""
        if ask.kind is AskKind.CANCEL:
            actions = self._cancel_here(ask.owner, ask.request_id, ask.reason)
            await self._perform(actions)
            found = len([a for a in actions if isinstance(a, Answer)])
        elif ask.kind is AskKind.ATTACH:
            found = 0
            if ask.reply_to != self.exchange.inbox:  # the asker looked here itself
                for request in self.table.find(ask.owner, ask.request_id):
                    found = int(self.table.watch(request.key, RemoteSink(
                        self.exchange, ask.reply_to, ask.key), ask.stream))
        else:
            found = len(self.table.find(ask.owner, ask.request_id))
        await self.exchange.deliver(ask.reply_to, Asked(ask.token, found))

    async def _on_watched(self, event: Watched) -> None:
        """An event, or the answer, of a request of another process we are attached to."""
        sink = self.attached.get(event.key)
        if sink is None:
            return
        if not event.final:
            request_id = protocol.loads_object(event.text)["request_id"]
            await sink.event(request_id, event.text, mergeable=event.mergeable)
            return
        del self.attached[event.key]
        await sink.answer(protocol.ApiResponse.from_json(event.text), event.text)


class RemoteSink:
    """A watcher in another process: what it is told goes to that process's inbox."""

    def __init__(self, exchange: Exchange, inbox: str, key: str) -> None:
        self.exchange = exchange
        self.inbox = inbox
        self.key = key

    async def answer(self, response: protocol.ApiResponse, text: str) -> None:
        await self.exchange.deliver(self.inbox, Watched(self.key, text, final=True))

    async def event(self, request_id: str, text: str, *, ack: Any = None,
                    mergeable: bool = False) -> None:
        await self.exchange.deliver(self.inbox, Watched(self.key, text, mergeable=mergeable))
        if ack is not None:
            await ack()
