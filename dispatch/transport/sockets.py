"""What both sockets share: the admission gate, the frame checks, a bounded outbox.

The sockets are the edges: frames in, frames out, admission and each connection's
own limits. What a frame means for a request or a worker is decided in
:mod:`dispatch.core` (the request table, the worker links); the worker socket also
answers what a worker asks of the broker itself (:mod:`dispatch.control.actions`).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections import deque
from typing import Any, Callable, TypeVar

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

from workers.protocol import CloseCode, ErrorCode, batch_frames, relayed

from .. import conf
from ..auth import Grant, get_guard, peer_of
from ..core.metering import meter
from ..logsafe import LogBudget
from .sendbuffer import Probe, probe_for

T = TypeVar("T")
#: Frames at least this long are parsed beside the event loop (:func:`parse`).
OFF_LOOP_CHARS = 64 * 1024


#: Seconds a socket may handle its peer's frames without letting the others have a turn.
TURN_SECONDS = 0.002
_turn = [0.0]  # when a socket last gave the loop back (loop time)


async def take_turns() -> None:
    """Let the other sockets have a turn if this one's has lasted TURN_SECONDS.

    A socket's frames wait in its queue, and taking one from a queue that is not empty
    does not give the loop back: a peer that pipelines a thousand cheap requests (8,700
    a second, each refused at once) held the loop for stretches of hundreds of ms, and
    another tenant's p50 went from 2.5 to 287 ms. With turns of 2 ms: 11-19 ms (of 0.5
    ms: 3-5 ms, but a yield costs: 7% of the loop at the bench's reference point, ~2% at
    2 ms)."""
    loop = asyncio.get_running_loop()
    if loop.time() - _turn[0] > TURN_SECONDS:
        await asyncio.sleep(0)
        _turn[0] = loop.time()


async def parse(parse: Callable[[str], T], text: str, relay: bool = True) -> T:
    """``parse(text)``, by default as a relay does (integers beyond 64 bits kept as they
    came: :func:`~workers.protocol.relayed`); on the loop for a small frame, beside it
    for a big one (a megabyte of dense JSON takes ~20 ms). A socket's next frame waits
    for it: one peer holds one thread at most, and the loop goes on serving the others."""
    if len(text) < OFF_LOOP_CHARS:
        return relayed(parse, text) if relay else parse(text)
    return await asyncio.to_thread(functools.partial(relayed, parse) if relay else parse, text)

log = logging.getLogger("dispatch.sockets")

#: The outbox entry key of a frame that a newer one may replace, and how far back from
#: the end of the outbox one is looked for.
MERGE_KEY = "broker.merge"
MERGE_WINDOW = 64

#: Refused connections of the whole process: a few lines at once, then one a second
#: (with how many were left out), however many peers knock.
REFUSAL_LOG = LogBudget(burst=20, refill_seconds=1.0)


class SocketState(enum.Enum):
    """Where a connection is in its life. Only an OPEN one is listened to."""

    CONNECTING = "connecting"  # handshake done, not yet admitted
    OPEN = "open"  # admitted: its frames are read
    CLOSING = "closing"  # refused, revoked, cut off or closed: whatever it sends is dropped


class BaseSocket(AsyncWebsocketConsumer):
    """A websocket consumer with a hard admission gate, a bounded outbox, and no channel.

    Admission: the socket is accepted, then judged (:meth:`admit`); a refused peer is
    told why and closed, and nothing it sends after that, during the close handshake
    or ever, is read: :meth:`receive` drops every frame unless the state is OPEN.

    Sending: :meth:`send_text` never waits for the peer; what the server cannot take
    at once waits in an outbox, and a peer that leaves more than
    :meth:`unsent_allowance` bytes unread is cut off (:attr:`CloseCode.TOO_SLOW`).

    Channels' ``dispatch`` closes stale database connections around every message
    (and again on disconnect), through a thread (``aclose_old_connections``); these
    sockets never touch the database, so that hop would only cost throughput. Nor
    do they listen on the channel layer: the process's dispatcher does, once for
    all of them, and calls them. A layer receiver per socket would cost a task and,
    with Redis, a share of one receive lock per process; cancelled at every
    disconnect, such a receiver can lose the message it was popping for the others.
    """

    #: Which credential kind this socket takes: "worker" or "requester".
    kind = ""
    state = SocketState.CONNECTING
    grant: Grant
    # Token bucket of the frame rate limit: frames this connection may send now.
    _allowance: float | None = None
    _checked = 0.0
    _writer: asyncio.Task[None] | None = None
    _gatherer: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' consumer loop, leaner: one source, so no task and no
        ``asyncio.wait`` per frame (Channels' ``await_many_dispatch``: ~10% under load)."""
        self.scope = scope
        self.base_send = send
        self.channel_layer = None
        self.peer = peer_of(scope.get("client"), scope.get("headers", ()))
        self.logs = LogBudget()
        self.probe: Probe = probe_for(send)
        self.outbox: deque[dict[str, Any]] = deque()
        self.outbox_bytes = 0
        #: Frames gathered into one batch frame, sent once this turn of the loop ends.
        self.gathered: list[str] = []
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        except Exception:
            await self._abandon()
            raise  # the server closes it (1011) and logs it, a few a while

    async def _abandon(self) -> None:
        """A bug met on this connection ends it: what it held goes as at a disconnect
        (a worker's entry at once, not when its heartbeats are missed)."""
        if self.state is SocketState.CLOSING:
            return
        self.state = SocketState.CLOSING
        if self._writer is not None:
            self._writer.cancel()
        try:
            await self.disconnect(1011)  # the code the server closes it with
        except Exception:  # noqa: BLE001 - the first error is the one raised
            log.exception("%s from %s: cleaning up after an error failed", self.kind,
                          self.peer)

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        self.state = SocketState.CLOSING
        if self._writer is not None:
            self._writer.cancel()
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        """Close after what is already queued, and stop listening at once: the peer's
        next frames are dropped."""
        if self.state is SocketState.CLOSING:
            return
        if self.gathered:  # answers gathered this turn go first (a refusal saying why)
            await self._send_gathered()
        self.state = SocketState.CLOSING
        message: dict[str, Any] = {"type": "websocket.close"}
        if code is not None and code is not True:
            message["code"] = int(code)
            if isinstance(code, CloseCode):
                meter.closed[(self.kind, code.name.lower())] += 1
        await self._emit(message)

    async def admit(self) -> bool:
        """Accept the socket, then check who it is; a refused peer is told why, then closed.

        Accepting first is what lets the reason reach the peer: daphne turns a refusal
        during the handshake into a bare HTTP 403.
        """
        guard = await get_guard()
        await self.accept()
        verdict = guard.admit(self.scope, self.kind)
        if not isinstance(verdict, Grant):
            REFUSAL_LOG.log(log, logging.INFO, "refused a %s from %s: %s", self.kind, self.peer,
                            verdict.reason)
            await self.refuse(verdict.reason, None, verdict.error)
            await self.close(verdict.code)
            return False
        self.grant = verdict
        self.guard = guard
        guard.attach(verdict, self)
        self.state = SocketState.OPEN
        return True

    async def turn_away(self) -> None:
        """This process is stopping and hands its work over: come back (here once it is
        back, or to another process). The close code says it all: refused work would be
        failed work, and an error frame reads as one to a client."""
        await self.close(CloseCode.SHUTTING_DOWN)

    async def revoke(self, reason: str) -> None:
        """The credential of this connection no longer admits it: say so and close."""
        await self.refuse(reason, None, ErrorCode.UNAUTHORIZED)
        await self.close(CloseCode.UNAUTHORIZED)

    def forget_grant(self) -> None:
        if hasattr(self, "guard"):
            self.guard.detach(self.grant, self)

    def within_rate(self, extra: int = 0) -> bool:
        """Token bucket: RATE_LIMIT frames a second on average, bursts of twice that;
        ``extra``: more frames to count (the rest of a batch)."""
        rate = conf.get("RATE_LIMIT")
        if not rate:
            return True
        now = time.monotonic()
        if self._allowance is None:
            self._allowance = 2.0 * rate
        else:
            self._allowance = min(2.0 * rate, self._allowance + (now - self._checked) * rate)
        self._checked = now
        if self._allowance < 1 + extra:
            return False
        self._allowance -= 1 + extra
        return True

    async def rate_limited(self) -> None:
        log.warning("%s sends faster than %s frames/s: closing it", self.peer,
                    conf.get("RATE_LIMIT"))
        await self.refuse(f"Rate limit exceeded ({conf.get('RATE_LIMIT')} frames/s)", None,
                          ErrorCode.LIMIT_EXCEEDED)
        await self.close(CloseCode.RATE_LIMITED)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None
                      ) -> None:
        await take_turns()
        if self.state is not SocketState.OPEN:
            return  # refused, revoked or closing: nothing it sends is read
        if not self.within_rate():
            await self.rate_limited()
            return
        if text_data is None:
            await self.refuse("Binary frames are not supported: send JSON as text", None,
                              ErrorCode.BAD_REQUEST)
            return
        limit = conf.get("MAX_MESSAGE_BYTES")
        if len(text_data) > limit or (len(text_data) * 4 > limit
                                      and len(text_data.encode()) > limit):
            await self.too_large(text_data, len(text_data.encode()), limit)
            return
        await self.receive_text(text_data)

    async def receive_text(self, text: str) -> None:
        raise NotImplementedError


    async def too_large(self, text: str, size: int, limit: int) -> None:
        """A frame over MAX_MESSAGE_BYTES (daphne passes up to 4x that): refused.

        Subclasses read it anyway, only to say which request it was about, so that
        request is answered at once instead of waiting for its timeout.
        """
        await self.refuse(f"Message too large: {size} bytes (limit {limit})", None,
                          ErrorCode.TOO_LARGE)

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        """Tell the peer that one frame was refused; the connection stays up."""
        raise NotImplementedError

    # -------------------------------------------------------------- sending

    async def send_text(self, text: str, merge_key: str | None = None) -> None:
        """Send one frame without ever waiting for the peer to read.

        A frame with a ``merge_key`` replaces one with the same key still waiting in the
        outbox (the newest progress report wins). Past :meth:`unsent_allowance` bytes
        unread (in the server's buffer and our outbox), the peer is cut off.
        """
        if self.state is SocketState.CLOSING:
            return
        if self.gathered:  # behind the gathered frames, in order
            self.gathered.append(text)
            return
        await self._send(text, merge_key)

    async def _send(self, text: str, merge_key: str | None = None) -> None:
        if merge_key is not None and self.outbox and self._merge(merge_key, text):
            return
        message = {"type": "websocket.send", "text": text}
        if merge_key is not None:
            message[MERGE_KEY] = merge_key
        await self._emit(message)
        if self.probe.unsent() + self.outbox_bytes > self.unsent_allowance():
            await self.too_slow()

    def gather(self, text: str) -> None:
        """Send ``text`` in a batch frame (a peer that accepts them): with whatever else
        is sent to this peer before the loop's turn ends, in as few frames as fit."""
        if self.state is SocketState.CLOSING:
            return
        self.gathered.append(text)
        if len(self.gathered) == 1:
            self._gatherer = asyncio.get_running_loop().create_task(self._send_gathered())

    async def _send_gathered(self) -> None:
        texts, self.gathered = self.gathered, []
        for frame in batch_frames(texts):
            if self.state is SocketState.CLOSING:
                return
            await self._send(frame)

    def _merge(self, key: str, text: str) -> bool:
        """Put ``text`` in place of the waiting frame with this key, if one is near the end."""
        for i in range(len(self.outbox) - 1, max(-1, len(self.outbox) - 1 - MERGE_WINDOW), -1):
            waiting = self.outbox[i]
            if waiting.get(MERGE_KEY) == key:
                self.outbox_bytes += len(text) - len(waiting["text"])
                waiting["text"] = text
                return True
        return False

    def unsent_allowance(self) -> int:
        """Bytes this peer may leave unread before it is cut off."""
        return conf.get("MAX_UNSENT_BYTES")

    async def _emit(self, message: dict[str, Any]) -> None:
        """Straight to the server when it can take it now; else into the outbox, in order."""
        if not self.outbox and not self.probe.would_wait():
            await self._to_server(message)
            return
        self.outbox.append(message)
        self.outbox_bytes += len(message.get("text") or "")
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _to_server(self, message: dict[str, Any]) -> None:
        """Hand a frame to the server. A peer that is gone but whose disconnect is not
        yet read makes the server raise (daphne: autobahn's ``Disconnected``): the frame
        had nowhere to go, and the socket is closing; nothing else is wrong."""
        try:
            await self.base_send(message)
        except Exception as exc:  # noqa: BLE001 - the server's own exception types vary
            if self.state is not SocketState.CLOSING:
                log.debug("%s %s: frame not sent, the connection is gone: %s", self.kind,
                          self.peer, exc)
            self.state = SocketState.CLOSING
            self.outbox.clear()
            self.outbox_bytes = 0

    async def _write(self) -> None:
        try:
            while self.outbox:
                message = self.outbox.popleft()
                self.outbox_bytes -= len(message.get("text") or "")
                message.pop(MERGE_KEY, None)
                await self._to_server(message)
        finally:
            self._writer = None

    async def too_slow(self) -> None:
        """The peer does not read what it is sent: cut it off before it costs memory."""
        unsent = self.probe.unsent() + self.outbox_bytes
        self.outbox.clear()
        self.outbox_bytes = 0
        log.warning("%s %s left %d bytes unread (limit %d): cutting it off", self.kind,
                    self.peer, unsent, self.unsent_allowance())
        await self.cut_off()
        if self.probe.would_wait():  # a close frame would wait behind the rest: drop it
            self.state = SocketState.CLOSING
            self.probe.abort()
        else:
            await self.close(CloseCode.TOO_SLOW)

    async def cut_off(self) -> None:
        """Let go of what the connection holds (its requests) before it is closed."""
