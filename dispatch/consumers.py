"""The two sockets: worker and requester. Thin edges between frames and services.

Each consumer has three sections, as in Channels' own examples: socket handlers
(frames in), frame/command helpers, and what the process's dispatcher calls with
the ``broker.*`` layer messages it receives for them (sockets have no channel of
their own). The real work is in :mod:`dispatch.forwarding` and the registry.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

from workers import protocol
from workers.handlers import run_safely
from workers.protocol import (ApiRequest, ApiResponse, CloseCode, Message, MessageType,
                              ProtocolError, Registration, RequestBody, ResponseBody, quote)

from . import conf, events
from .actions import actions, message_handlers
from .auth import Grant, get_guard, peer_of
from .forwarding import Dispatcher, get_dispatcher
from .history import get_recorder
from .logsafe import LogBudget
from .registry import RegistryUnavailable, WorkerEntry, WorkerIdTaken
from .sendbuffer import Probe, probe_for

log = logging.getLogger("dispatch.consumers")


class SocketState(enum.Enum):
    """Where a connection is in its life. Only an OPEN one is listened to."""

    CONNECTING = "connecting"  # handshake done, not yet admitted
    OPEN = "open"  # admitted: its frames are read
    CLOSING = "closing"  # refused, revoked, cut off or closed: whatever it sends is dropped


class LeanWebsocketConsumer(AsyncWebsocketConsumer):
    """A websocket consumer with a hard admission gate, a bounded outbox, and no channel.

    Admission: the socket is accepted, then judged (:meth:`admit`); a refused peer is
    told why and closed, and nothing it sends after that, during the close handshake
    or ever, is read: :meth:`receive` drops every frame unless the state is OPEN.

    Sending: :meth:`send_text` never waits for the peer; what the server cannot take
    at once waits in an outbox, and a peer that leaves more than ``max_unsent`` bytes
    unread is cut off (:attr:`CloseCode.TOO_SLOW`).

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

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Channels' consumer loop, leaner: one source, so no task and no
        ``asyncio.wait`` per frame (Channels' ``await_many_dispatch``: ~10% under load)."""
        self.scope = scope
        self.base_send = send
        self.channel_layer = None
        self.peer = peer_of(scope.get("client"), scope.get("headers", ()))
        self.logs = LogBudget()
        self.probe: Probe = probe_for(send)
        self.outbox: deque[str] = deque()
        self.outbox_bytes = 0
        self.max_unsent = conf.get("MAX_UNSENT_BYTES")
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

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
        self.state = SocketState.CLOSING
        message: dict[str, Any] = {"type": "websocket.close"}
        if code is not None and code is not True:
            message["code"] = int(code)
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
            self.logs.log(log, logging.INFO, "refused a %s from %s: %s", self.kind, self.peer,
                          verdict.reason)
            await self.refuse(verdict.reason)
            await self.close(verdict.code)
            return False
        self.grant = verdict
        self.guard = guard
        guard.attach(verdict, self)
        self.state = SocketState.OPEN
        return True

    async def revoke(self, reason: str) -> None:
        """The credential of this connection no longer admits it: say so and close."""
        await self.refuse(reason)
        await self.close(CloseCode.UNAUTHORIZED)

    def forget_grant(self) -> None:
        if hasattr(self, "guard"):
            self.guard.detach(self.grant, self)

    def within_rate(self) -> bool:
        """Token bucket: RATE_LIMIT frames a second on average, bursts of twice that."""
        rate = conf.get("RATE_LIMIT")
        if not rate:
            return True
        now = time.monotonic()
        if self._allowance is None:
            self._allowance = 2.0 * rate
        else:
            self._allowance = min(2.0 * rate, self._allowance + (now - self._checked) * rate)
        self._checked = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None
                      ) -> None:
        if self.state is not SocketState.OPEN:
            return  # refused, revoked or closing: nothing it sends is read
        if not self.within_rate():
            log.warning("%s sends faster than %s frames/s: closing it", self.peer,
                        conf.get("RATE_LIMIT"))
            await self.refuse(f"Rate limit exceeded ({conf.get('RATE_LIMIT')} frames/s)")
            await self.close(CloseCode.RATE_LIMITED)
            return
        if text_data is None:
            await self.refuse("Binary frames are not supported: send JSON as text")
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
        await self.refuse(f"Message too large: {size} bytes (limit {limit})")

    async def refuse(self, error: str, request_id: str | None = None) -> None:
        """Tell the peer that one frame was refused; the connection stays up."""
        raise NotImplementedError

    # -------------------------------------------------------------- sending

    async def send_text(self, text: str) -> None:
        """Send one frame without ever waiting for the peer to read.

        Past ``max_unsent`` bytes unread (in the server's buffer and our outbox), the
        peer is cut off.
        """
        if self.state is SocketState.CLOSING:
            return
        await self._emit({"type": "websocket.send", "text": text})
        if self.probe.unsent() + self.outbox_bytes > self.max_unsent:
            await self.too_slow()

    async def _emit(self, message: dict[str, Any]) -> None:
        """Straight to the server when it can take it now; else into the outbox, in order."""
        if not self.outbox and not self.probe.would_wait():
            await self.base_send(message)
            return
        self.outbox.append(message)
        self.outbox_bytes += len(message.get("text") or "")
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self.outbox:
                message = self.outbox.popleft()
                self.outbox_bytes -= len(message.get("text") or "")
                await self.base_send(message)
        finally:
            self._writer = None

    async def too_slow(self) -> None:
        """The peer does not read what it is sent: cut it off before it costs memory."""
        unsent = self.probe.unsent() + self.outbox_bytes
        self.outbox.clear()
        self.outbox_bytes = 0
        log.warning("%s %s left %d bytes unread (limit %d): cutting it off", self.kind,
                    self.peer, unsent, self.max_unsent)
        await self.cut_off()
        if self.probe.would_wait():  # a close frame would wait behind the rest: drop it
            self.state = SocketState.CLOSING
            self.probe.abort()
        else:
            await self.close(CloseCode.TOO_SLOW)

    async def cut_off(self) -> None:
        """Let go of what the connection holds (its requests) before it is closed."""


# ---------------------------------------------------------------------------- workers


@dataclass(slots=True)
class Assignment:
    """A request this worker has been given and has yet to answer."""

    reply_to: str
    started: float  # time.monotonic()
    deadline: float  # time.monotonic()


class WorkerConsumer(LeanWebsocketConsumer):
    """One worker's socket: registration, heartbeats, forwarded requests, answers."""

    kind = "worker"
    entry: WorkerEntry | None = None
    dispatcher: Dispatcher
    watchdog: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- socket handlers

    async def connect(self) -> None:
        self.dispatcher = await get_dispatcher()
        self.recorder = get_recorder()  # once: heartbeats are most of an idle fleet's work
        self.session_id = protocol.random_id(16)
        # Names this connection in the registry and in its dispatcher (no layer channel).
        self.channel_name = f"worker.{self.session_id}"
        self.assignments: dict[str, Assignment] = {}
        self.opened = self.last_frame = self.last_ack = time.monotonic()
        self.closed = False
        if await self.admit():
            self.watchdog = asyncio.create_task(self._watch(), name=f"watch-{self.session_id}")
        else:
            self.closed = True

    async def disconnect(self, code: int) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.forget_grant()
        await self._teardown(f"disconnected ({code})")

    async def revoke(self, reason: str) -> None:
        await self.refuse(reason)
        await self._close_and_teardown(CloseCode.UNAUTHORIZED, reason)

    async def cut_off(self) -> None:
        await self._teardown("too slow to read")

    async def receive_text(self, text: str) -> None:
        self.last_frame = time.monotonic()
        try:
            msg = Message.from_json(text)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        handler = self.FRAME_HANDLERS.get(msg.type)
        if msg.type != MessageType.CONNECT.value and self.entry is None:
            await self.refuse("Register first: send a 'connect' frame", msg.msg_id)
            return
        try:
            if handler is not None:
                await handler(self, msg)
            elif msg.type in message_handlers:
                await message_handlers[msg.type](self, msg)
            else:
                await self.refuse(f"Unknown message type '{quote(msg.type)}'", msg.msg_id)
        except ProtocolError as exc:
            await self.refuse(str(exc), msg.msg_id)
        except RegistryUnavailable as exc:
            log.warning("worker %s: %s", self.worker_label, exc)
            await self.refuse(f"{protocol.BROKER_UNAVAILABLE}: {exc}", msg.msg_id)

    async def refuse(self, error: str, request_id: str | None = None) -> None:
        self.logs.log(log, logging.INFO, "worker %s: refused a frame: %s", self.worker_label,
                      quote(error, 300))
        await self.send_frame(Message.error(error, reply_to=request_id))

    async def too_large(self, text: str, size: int, limit: int) -> None:
        """An answer too large to pass on fails its request now, and frees the slot."""
        try:
            msg = Message.from_json(text)
            body = ResponseBody.from_message(msg) if msg.type == "response" else None
        except ProtocolError:
            msg = body = None
        assignment = self.assignments.pop(body.request_id, None) if body else None
        if assignment is None or self.entry is None:
            await self.refuse(f"Message too large: {size} bytes (limit {limit})",
                              msg.msg_id if msg else None)
            return
        error = f"{protocol.ANSWER_TOO_LARGE}: {size} bytes > limit {limit}"
        await self.dispatcher.release(self.entry.worker_id, latency_ms=None, ok=False)
        await self.dispatcher.deliver(assignment.reply_to, events.reply(
            body.request_id, self.entry.worker_id, False, None, error,  # type: ignore[union-attr]
            (time.monotonic() - assignment.started) * 1000))
        await self.refuse(f"{error}: request {quote(body.request_id)} failed; "  # type: ignore
                          "send smaller answers", msg.msg_id)  # type: ignore[union-attr]

    # -------------------------------------------------------------- frame helpers

    @property
    def worker_label(self) -> str:
        return quote(self.entry.worker_id) if self.entry else f"(unregistered {self.peer})"

    async def send_frame(self, msg: Message) -> None:
        if not self.closed:
            await self.send_text(msg.to_json())

    async def on_connect(self, msg: Message) -> None:
        if self.entry is not None:
            raise ProtocolError("Already registered on this connection")
        try:
            reg = Registration.from_data(msg.data)
            refused = self.grant.refused_commands([*reg.commands, *reg.no_retry])
            if refused:
                raise ProtocolError(
                    "Commands not allowed for this worker token: "
                    + ", ".join(f"'{quote(c, 60)}'" for c in refused[:20])
                    + (f" and {len(refused) - 20} more" if len(refused) > 20 else ""))
        except ProtocolError as exc:
            await self.refuse(f"Bad registration: {exc}", msg.msg_id)
            await self.close(CloseCode.BAD_REGISTRATION)
            return
        weight = min(reg.weight, conf.get("MAX_WORKER_WEIGHT"))
        max_concurrency = min(reg.max_concurrency, conf.get("MAX_WORKER_CONCURRENCY"))
        if (weight, max_concurrency) != (reg.weight, reg.max_concurrency):
            log.warning("worker %s asked for weight %s and max_concurrency %s; capped to %s "
                        "and %s (BROKER_MAX_WORKER_WEIGHT, BROKER_MAX_WORKER_CONCURRENCY)",
                        quote(reg.worker_id), reg.weight, reg.max_concurrency, weight,
                        max_concurrency)
        entry = WorkerEntry(
            worker_id=reg.worker_id, name=reg.name, channel=self.channel_name,
            commands=frozenset(reg.commands), weight=weight,
            max_concurrency=max_concurrency, process=self.dispatcher.process,
            address=str(self.peer), session_id=self.session_id,
            no_retry=frozenset(reg.no_retry), inbox=self.dispatcher.channel,
            owner=self.grant.owner)
        try:
            replaced = await self.dispatcher.registry.add(entry)
        except WorkerIdTaken:
            self.logs.log(log, logging.WARNING, "%s tried to register worker id %s, which "
                          "belongs to another credential: refused", self.peer,
                          quote(reg.worker_id))
            await self.refuse(f"Worker id '{quote(reg.worker_id)}' belongs to another "
                              "credential: choose another id", msg.msg_id)
            await self.close(CloseCode.WORKER_ID_TAKEN)
            return
        except RegistryUnavailable as exc:  # the worker retries with backoff
            await self.refuse(f"{protocol.BROKER_UNAVAILABLE}: {exc}", msg.msg_id)
            await self.close(CloseCode.TRY_AGAIN_LATER)
            return
        self.entry = entry
        # A worker may rightly have max_concurrency requests of the largest size on
        # their way to it; one that does not read at all is caught by its pings.
        self.max_unsent = max(self.max_unsent,
                              max_concurrency * conf.get("MAX_MESSAGE_BYTES"))
        if replaced is not None and replaced.channel != self.channel_name:
            log.warning("worker %s reconnected; closing its previous connection",
                        quote(reg.worker_id))
            await self.dispatcher.deliver(replaced.inbox, events.kick(
                replaced.channel, "Replaced by a newer connection with the same worker_id",
                CloseCode.REPLACED))
        self.dispatcher.local_workers[self.channel_name] = self
        await self.send_frame(Message(MessageType.CONNECT.value, {
            "worker_id": reg.worker_id,
            "heartbeat_interval": conf.get("HEARTBEAT_INTERVAL"),
            "process": self.dispatcher.process,
            "weight": weight,
            "max_concurrency": max_concurrency,
        }))
        self.recorder.worker_connected(
            session_id=self.session_id, worker_id=reg.worker_id, name=reg.name,
            address=str(self.peer), process=self.dispatcher.process, commands=reg.commands,
            weight=weight, max_concurrency=max_concurrency,
            connected_at=self.entry.connected_at)
        self.dispatcher.kick()
        log.info("worker %s (%s) registered from %s: %s", quote(reg.worker_id),
                 quote(reg.name), self.peer, quote(", ".join(reg.commands), 300))

    async def on_heartbeat(self, msg: Message) -> None:
        entry = self.entry
        assert entry is not None
        # The socket is alive whatever the registry says: ack first.
        if "ack" in msg.data:
            self.last_ack = time.monotonic()
        else:
            await self.send_frame(Message.heartbeat(ack=msg.msg_id))
        self.recorder.worker_seen(self.session_id, time.time())
        try:
            if not await self.dispatcher.registry.touch(entry.worker_id):
                await self._register_again(entry)
        except RegistryUnavailable as exc:  # touched again at the next beat
            self.logs.log(log, logging.WARNING, "worker %s: heartbeat not recorded: %s",
                          self.worker_label, exc)

    async def _register_again(self, entry: WorkerEntry) -> None:
        """Put a live worker back after the shared state lost it (Redis restarted empty)."""
        log.warning("worker %s was missing from the registry; registering it again",
                    quote(entry.worker_id))
        entry.in_flight = len(self.assignments)
        try:
            await self.dispatcher.registry.add(entry)
        except WorkerIdTaken:  # another credential took the id meanwhile: it is theirs now
            await self.refuse(f"Worker id '{quote(entry.worker_id)}' belongs to another "
                              "credential now")
            await self._close_and_teardown(CloseCode.WORKER_ID_TAKEN, "worker id taken")

    async def on_response(self, msg: Message) -> None:
        body = ResponseBody.from_message(msg)
        assignment = self.assignments.pop(body.request_id, None)
        if assignment is None:
            self.dispatcher.stats["late"] += 1
            self.logs.log(log, logging.WARNING, "worker %s answered request %s, which it does "
                          "not hold (late or unknown): dropped", self.worker_label,
                          quote(body.request_id))
            await self.refuse(f"Not holding request '{quote(body.request_id)}' (answered "
                              "already, timed out, or never sent): answer dropped", msg.msg_id)
            return
        latency_ms = (time.monotonic() - assignment.started) * 1000
        try:
            await self.dispatcher.release(self.entry.worker_id,  # type: ignore[union-attr]
                                          latency_ms=latency_ms, ok=body.success)
        except RegistryUnavailable as exc:  # the answer still goes out
            log.warning("worker %s: could not release its slot: %s", self.worker_label, exc)
        await self.dispatcher.deliver(assignment.reply_to, events.reply(
            body.request_id, self.entry.worker_id, body.success, body.data,  # type: ignore
            body.error, latency_ms))

    async def on_request(self, msg: Message) -> None:
        """A worker asks the broker itself (server actions)."""
        body = RequestBody.from_message(msg)
        success, data, error = await run_safely(actions, body.action, body.params)
        await self.send_frame(Message.response(msg.msg_id, success, data, error))

    async def on_disconnect(self, msg: Message) -> None:
        """The worker is leaving: no new work; it closes once its requests are done."""
        log.info("worker %s is draining before it leaves", self.worker_label)
        await self.dispatcher.registry.set_draining(self.entry.worker_id, True)  # type: ignore

    async def on_notification(self, msg: Message) -> None:
        self.logs.log(log, logging.INFO, "worker %s says: %s", self.worker_label,
                      quote(msg.data.get("message"), 300))

    async def on_error(self, msg: Message) -> None:
        self.logs.log(log, logging.WARNING, "worker %s reported an error: %s",
                      self.worker_label, quote(msg.data.get("error"), 300))

    FRAME_HANDLERS = {
        MessageType.CONNECT.value: on_connect,
        MessageType.HEARTBEAT.value: on_heartbeat,
        MessageType.RESPONSE.value: on_response,
        MessageType.REQUEST.value: on_request,
        MessageType.DISCONNECT.value: on_disconnect,
        MessageType.NOTIFICATION.value: on_notification,
        MessageType.ERROR.value: on_error,
    }

    async def assign(self, message: dict[str, Any]) -> None:
        """Hand one forwarded request to the worker (from the layer or in-process)."""
        if self.closed or self.entry is None:
            await self.dispatcher.deliver(message["reply_to"], events.lost(
                message["key"], self.entry.worker_id if self.entry else "", "connection closed"))
            return
        now = time.monotonic()
        self.assignments[message["key"]] = Assignment(message["reply_to"], now,
                                                      now + message["timeout"])
        await self.send_frame(Message.request(message["action"], message["params"],
                                              msg_id=message["key"]))

    @property
    def busy(self) -> int:
        """Requests this worker holds."""
        return len(self.assignments)

    async def stop_taking_work(self) -> None:
        """Out of rotation: what it holds still finishes."""
        if self.entry is not None:
            try:
                await self.dispatcher.registry.set_draining(self.entry.worker_id, True)
            except RegistryUnavailable as exc:
                log.warning("worker %s: could not take it out of rotation: %s",
                            self.worker_label, exc)

    async def leave(self, reason: str) -> None:
        """The broker is going away: tell the worker, then close."""
        await self.send_frame(Message(MessageType.DISCONNECT.value, {"reason": reason}))
        await self._close_and_teardown(CloseCode.SHUTTING_DOWN, reason)

    async def _watch(self) -> None:
        """Ping, drop the silent, release slots of requests past their deadline."""
        interval = conf.get("HEARTBEAT_INTERVAL")
        silence_limit = interval * conf.get("HEARTBEAT_MISSES")
        # One wake-up per interval per worker, and a ping every other interval: with
        # thousands of idle workers these timers are most of what the broker does.
        # A ping answered within two intervals keeps last_ack well inside its limit.
        tick = interval
        next_ping = time.monotonic() + interval
        while not self.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self.entry is None and now - self.opened > conf.get("REGISTER_TIMEOUT"):
                await self.refuse("No 'connect' frame in time; closing")
                await self._close_and_teardown(CloseCode.BAD_REGISTRATION, "did not register")
                return
            if now - self.last_frame > silence_limit:
                log.warning("worker %s silent for %.1fs: dropping it", self.worker_label,
                            now - self.last_frame)
                await self._close_and_teardown(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                return
            if self.entry is not None and now - self.last_ack > silence_limit + interval:
                # It talks but does not answer our pings: it is not reading its socket,
                # and what we send it would pile up in memory.
                log.warning("worker %s has not answered a ping for %.1fs: dropping it",
                            self.worker_label, now - self.last_ack)
                await self._close_and_teardown(CloseCode.HEARTBEAT_TIMEOUT,
                                               "not answering pings")
                return
            if now >= next_ping and self.entry is not None:
                next_ping = now + 2 * interval
                await self.send_frame(Message.heartbeat())
            try:
                await self._expire_assignments(now)
            except RegistryUnavailable as exc:
                log.warning("worker %s: %s", self.worker_label, exc)

    async def _expire_assignments(self, now: float) -> None:
        for key in [k for k, a in self.assignments.items() if a.deadline < now]:
            del self.assignments[key]
            await self.dispatcher.release(self.entry.worker_id,  # type: ignore[union-attr]
                                          latency_ms=None, ok=False)

    async def _close_and_teardown(self, code: int, reason: str) -> None:
        await self._teardown(reason)
        await self.close(code)

    async def _teardown(self, reason: str) -> None:
        """Leave the registry and hand every unanswered request back: once only."""
        if self.closed:
            return
        self.closed = True
        self.dispatcher.local_workers.pop(self.channel_name, None)
        if self.entry is None:
            return
        try:
            await self.dispatcher.registry.remove(self.entry.worker_id, self.channel_name)
        except RegistryUnavailable as exc:  # its entry expires with its heartbeat
            log.warning("worker %s: could not leave the registry: %s", self.worker_label, exc)
        assignments, self.assignments = self.assignments, {}
        for key, assignment in assignments.items():
            await self.dispatcher.deliver(assignment.reply_to,
                                          events.lost(key, self.entry.worker_id, reason))
        self.recorder.worker_disconnected(self.session_id, time.time(),
                                          self.entry.completed + self.entry.errors)
        log.info("worker %s left (%s); %d request(s) handed back", self.worker_label,
                 reason, len(assignments))

    # -------------------------------------------------------------- from the dispatcher

    async def notify(self, message: dict[str, Any]) -> None:
        """A broadcast (``broker.notify``) to pass on."""
        if self.entry is not None:
            await self.send_frame(Message.notification(message["message"],
                                                       **message.get("extra", {})))

    async def kick(self, reason: str, code: int) -> None:
        """Close this socket, saying why (a newer connection took its worker id)."""
        await self.send_frame(Message.error(reason))
        await self._close_and_teardown(code, reason)


# ---------------------------------------------------------------------------- requesters


class RequesterConsumer(LeanWebsocketConsumer):
    """A requester's socket: the seed's JSON API, many requests in flight at once.

    Its answers arrive through the process's dispatcher.
    """

    kind = "requester"
    dispatcher: Dispatcher

    async def connect(self) -> None:
        self.dispatcher = await get_dispatcher()
        self.in_flight: dict[str, tuple[str, int]] = {}  # request_id -> (key, frame size)
        self.in_flight_bytes = 0
        await self.admit()

    async def disconnect(self, code: int) -> None:
        self.forget_grant()
        await self.cut_off()

    async def cut_off(self) -> None:
        """Its requests are abandoned: their answers, when they come, are dropped."""
        self.dispatcher.abandon([key for key, _ in self.in_flight.values()])
        self.in_flight.clear()
        self.in_flight_bytes = 0

    async def receive_text(self, text: str) -> None:
        try:
            request = ApiRequest.from_json(text)
        except ProtocolError as exc:
            await self.refuse(str(exc), exc.request_id)
            return
        if not self.grant.allows(request.command):
            await self.refuse(f"Command '{quote(request.command)}' is not allowed for this "
                              "API key", request.request_id)
            return
        if len(self.in_flight) >= conf.get("MAX_IN_FLIGHT"):
            await self.refuse(f"Too many requests in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT')})", request.request_id)
            return
        if self.in_flight_bytes + len(text) > conf.get("MAX_IN_FLIGHT_BYTES"):
            await self.refuse(f"Too much data in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT_BYTES')} bytes of requests): wait "
                              "for answers first", request.request_id)
            return
        if request.request_id in self.in_flight:
            await self.refuse(f"Duplicate request_id '{quote(request.request_id)}': a request "
                              "with this id is still in flight", request.request_id)
            return
        key = protocol.new_id()
        self.in_flight[request.request_id] = (key, len(text))
        self.in_flight_bytes += len(text)
        await self.dispatcher.submit(
            request.command, request.data, self.respond, request_id=request.request_id,
            requester=str(self.peer), timeout=request.timeout, key=key)

    async def refuse(self, error: str, request_id: str | None = None) -> None:
        await self.send_text(ApiResponse.failure(request_id, error).to_json())

    async def too_large(self, text: str, size: int, limit: int) -> None:
        """Refused, with its request_id when it can be read, so the caller can match it."""
        try:
            request_id = protocol.loads_object(text).get("request_id")
        except ProtocolError:
            request_id = None
        await self.refuse(f"Message too large: {size} bytes (limit {limit})",
                          request_id if isinstance(request_id, str)
                          and len(request_id) <= protocol.MAX_ID_CHARS else None)

    async def respond(self, response: ApiResponse) -> None:
        """Called by the dispatcher, once per request."""
        held = self.in_flight.pop(response.request_id, None)  # type: ignore[arg-type]
        if held is not None:
            self.in_flight_bytes -= held[1]
            await self.send_text(response.to_json())
