"""This process's inbox on the channel layer, and the events it sends the others.

Any number of broker processes share one fleet: a request for a worker held by
another process goes to that process's inbox as an event (:mod:`.events`), and the
worker's answer comes back to this one's. Within one process nothing crosses the
layer: :meth:`Exchange.deliver` hands the event to its handler directly. Events
that gather for one inbox while the previous send to the layer is under way go as
one layer message. Layer failures surface here, and only here, as
:class:`~dispatch.errors.LayerUnavailable` / :class:`~dispatch.errors.LayerFull`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Awaitable, Callable, TypeVar

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from workers import protocol

from ..errors import LayerFull, LayerUnavailable
from ..loops import Batcher
from . import events, inbox
from .events import Ask, AskKind, Asked, Event, UnknownEvent

log = logging.getLogger("dispatch.exchange")

E = TypeVar("E", bound=Event)
Handler = Callable[[Any], Awaitable[None]]
#: Called with the events that could not be sent to another process, and why.
Undelivered = Callable[[list[Event], LayerUnavailable], Awaitable[None]]


class Exchange:
    """Events in and out of this process, by type to their handlers."""

    def __init__(self, layer: BaseChannelLayer, stats: Counter[str]) -> None:
        self.layer = layer
        self.stats = stats
        self.inbox = ""  # this process's channel on the layer, once started
        self._handlers: dict[type[Any], Handler] = {Asked: self._on_asked}
        self._outbox: Batcher[tuple[str, Event]] = Batcher(self._send, "exchange-send")
        self._asks: dict[str, asyncio.Queue[int]] = {}  # token -> what the others found
        self.undelivered: Undelivered | None = None

    def on(self, kind: type[E], handler: Callable[[E], Awaitable[None]]) -> None:
        """Events of ``kind`` go to ``handler`` (one per kind)."""
        self._handlers[kind] = handler

    async def start(self, wanted: Callable[[], bool]) -> asyncio.Task[None]:
        """Open the inbox; returns the task listening to it while ``wanted()``."""
        self.inbox = await self.layer.new_channel()
        await self.join()
        return asyncio.create_task(inbox.listen(self.layer, self.inbox, self._received,
                                                "exchange", wanted), name="dispatch-inbox")

    async def join(self) -> None:
        """(Re)join the group every process's inbox is in: at start, then now and then,
        so that membership survives a Redis restart."""
        try:
            await self.layer.group_add(events.INBOXES_GROUP, self.inbox)
        except inbox.OUTAGE as exc:  # the next try is soon
            log.warning("could not join the broadcast group: %s", exc)

    async def leave(self) -> None:
        try:
            await self.layer.group_discard(events.INBOXES_GROUP, self.inbox)
        except inbox.OUTAGE as exc:  # its membership expires
            log.warning("could not leave the broadcast group: %s", exc)

    # ------------------------------------------------------------------ in

    async def handle(self, event: Event) -> None:
        """An event for this process (from the layer, or from this process itself)."""
        handler = self._handlers.get(type(event))
        if handler is None:
            log.warning("no handler for a %s event: dropped", event.TYPE)
            return
        await handler(event)

    async def _received(self, message: dict[str, Any]) -> None:
        for event in events.from_layer(message):
            if isinstance(event, UnknownEvent):
                self.stats["layer_unknown"] += 1
                log.warning("ignored a layer message: %s", protocol.quote(str(event), 200))
                continue
            try:
                await self.handle(event)
            except Exception:  # one bad event must not lose the rest of its batch
                log.exception("failed to handle a %s event", event.TYPE)

    async def _on_asked(self, event: Asked) -> None:
        replies = self._asks.get(event.token)
        if replies is not None:
            replies.put_nowait(event.found)

    # ------------------------------------------------------------------ out

    async def deliver(self, to: str, event: Event) -> None:
        """Send to a process's inbox: this one's at once, another's in a batch."""
        if to == self.inbox:
            await self.handle(event)
        else:
            self._outbox.add((to, event))

    async def broadcast(self, event: Event) -> None:
        """To every process (this one too). Raises :class:`LayerUnavailable`."""
        try:
            await self.layer.group_send(events.INBOXES_GROUP, events.to_layer(event))
        except inbox.OUTAGE as exc:
            raise LayerUnavailable(str(exc)) from exc

    async def _send(self, items: list[tuple[str, Event]]) -> None:
        """The outbox's batch: one layer message per destination inbox."""
        by_inbox: dict[str, list[Event]] = {}
        for to, event in items:
            by_inbox.setdefault(to, []).append(event)
        await asyncio.gather(*(self._send_one(to, batch) for to, batch in by_inbox.items()))

    async def _send_one(self, to: str, batch: list[Event]) -> None:
        try:
            try:
                await self.layer.send(to, events.batch_to_layer(batch))
            except ChannelFull as exc:
                raise LayerFull("channel full") from exc
            except inbox.OUTAGE as exc:
                raise LayerUnavailable(str(exc)) from exc
            except (TypeError, ValueError, OverflowError) as exc:  # one cannot be written
                if len(batch) > 1:  # the others go on without it
                    await asyncio.gather(*(self._send_one(to, [e]) for e in batch))
                    return
                log.exception("could not write a %s event for %s", batch[0].TYPE, to)
                raise LayerUnavailable(f"could not write it: {exc}") from exc
        except LayerUnavailable as exc:
            full = isinstance(exc, LayerFull)
            self.stats["channel_full" if full else "layer_errors"] += 1
            log.warning("could not pass %d event(s) on to %s: %s", len(batch), to, exc)
            if self.undelivered is not None:
                await self.undelivered(batch, exc)

    # ------------------------------------------------------------------ asking

    async def ask_all(self, kind: AskKind, owner: str | None, request_id: str, *,
                      first: bool = False, wait: float = 1.0, reason: str = "",
                      key: str = "", stream: bool = False) -> int:
        """Ask every process (this one too) about a request; sum what they found within
        ``wait`` seconds (or stop at the first that found it, with ``first``)."""
        token = protocol.new_id()
        replies = self._asks[token] = asyncio.Queue()
        found = 0
        try:
            await self.broadcast(Ask(kind, owner, request_id, self.inbox, token, reason,
                                     key, stream))
            async with asyncio.timeout(wait):
                while True:
                    found += await replies.get()
                    if first and found:
                        break
        except TimeoutError:
            pass
        except LayerUnavailable as exc:  # nobody else answers
            log.warning("could not ask the other processes about %s: %s",
                        protocol.quote(request_id), exc)
        finally:
            del self._asks[token]
        return found

    async def round_trip(self, timeout: float) -> str | None:
        """Why an event sent through the layer to this process's own inbox did not come
        back handled within ``timeout`` (None: it did). A stalled listener, or a layer
        that takes messages nobody reads, fails here."""
        token = protocol.new_id()
        replies = self._asks[token] = asyncio.Queue()
        try:
            async with asyncio.timeout(timeout):
                await self.layer.send(self.inbox, events.to_layer(Asked(token, 1)))
                await replies.get()
        except TimeoutError:
            return (f"channel layer: a message to this process's inbox was not handled "
                    f"within {timeout:g} s")
        except (ChannelFull, *inbox.OUTAGE) as exc:
            return f"channel layer: {type(exc).__name__}: {exc}"
        finally:
            del self._asks[token]
        return None
