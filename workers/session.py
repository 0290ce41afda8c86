"""One connection of a worker to the broker, from registration to close.

The reconnecting :class:`~workers.client.Worker` makes a new :class:`Session` for
each connection, so nothing of one connection's state (requests running, pings,
requests of ours awaiting answers) survives into the next by accident.

What a frame from the broker asks the worker to do is decided by :func:`react`, a
pure function from a parsed frame to one :class:`Reaction`; the session carries
it out on its socket. Tests drive :func:`react` without any socket.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .errors import ConnectionLost, RegistrationFailed, describe
from .outbox import Outbox, Spawn
from .protocol import (BATCH_BYTES, ChunkBody, ErrorCode, Feature, Message, MessageType,
                       ProtocolError, Registration, RequestBody, ResponseBody, batch_messages,
                       loads_frames)
from .runner import Runner

logger = logging.getLogger("workers.client")

#: Heartbeat intervals of silence after which the connection is presumed dead.
DEAD_AFTER_MISSES = 3
#: With quiet heartbeats (the broker answers a beat only when asked), a beat asks once
#: the broker has been silent this many intervals, and the connection is presumed dead
#: after QUIET_DEAD_AFTER: one frame per idle interval and an answer every third.
ASK_AFTER_MISSES = 3
QUIET_DEAD_AFTER = 5
#: Longest wait a broker's ``retry_after`` may ask for, in seconds.
MAX_RETRY_AFTER = 120.0
#: Seconds the broker has to answer our ``connect`` frame.
REGISTER_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0

SHUTTING_DOWN = "Worker shutting down"

#: ``fn(message)``, sync or async; may return a :class:`Message` to send back.
MessageHandler = Callable[[Message], Any]


# ---------------------------------------------------------------------------- reactions


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this frame back at once."""

    message: Message


@dataclass(frozen=True, slots=True)
class Run:
    """Run the command the broker sent, then answer ``request_id`` with its outcome."""

    request_id: str
    body: RequestBody


@dataclass(frozen=True, slots=True)
class Resolve:
    """An answer to a request of ours (``request_id`` is its ``msg_id``)."""

    request_id: str
    body: ResponseBody


@dataclass(frozen=True, slots=True)
class Leave:
    """The broker is going away: close; the worker reconnects (after ``retry_after``
    seconds when the broker says when, so that a fleet does not come back at once)."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Handle:
    """Pass the frame to the handlers registered for its type (``Worker.on``).

    ``reply_on_error``: a failing handler gets the broker an ``error`` frame about it
    (for types of the user's own; not for notifications and errors).
    """

    message: Message
    reply_on_error: bool


@dataclass(frozen=True, slots=True)
class CancelJob:
    """Stop the request ``request_id`` (the requester cancelled it, or its lease ran out)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Acked:
    """A chunk of ``request_id`` was passed on: it may send another."""

    request_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do (logged where it is interesting)."""

    why: str


@dataclass(frozen=True, slots=True)
class AdoptJobs:
    """The broker adopted these jobs of before (reported when registering): go on."""

    request_ids: list[str]


Reaction = Reply | Run | Resolve | Leave | Handle | CancelJob | Acked | AdoptJobs | Ignore


def react(msg: Message, *, stopping: bool, handled: Collection[str],
          in_flight: int = 0) -> Reaction:
    """What the worker does with one frame from the broker; ``handled``: the types with
    handlers of the user's own; ``in_flight``: requests running (told in ping answers)."""
    kind = msg.type
    if kind == MessageType.HEARTBEAT.value:
        if "ack" in msg.data:
            return Ignore("heartbeat ack")
        return Reply(Message.heartbeat(ack=msg.msg_id, in_flight=in_flight))
    if kind == MessageType.REQUEST.value:
        if stopping:
            return Reply(Message.response(msg.msg_id, False, None, SHUTTING_DOWN,
                                          ErrorCode.WORKER_STOPPING))
        try:
            return Run(msg.msg_id, RequestBody.from_message(msg))
        except ProtocolError as exc:
            return Reply(Message.response(msg.msg_id, False, None, str(exc),
                                          ErrorCode.BAD_REQUEST))
    if kind == MessageType.RESPONSE.value:
        try:
            body = ResponseBody.from_message(msg)
        except ProtocolError as exc:
            return Ignore(f"unreadable response: {exc}")
        return Resolve(body.request_id, body)
    if kind == MessageType.ERROR.value:
        reply_to = msg.data.get("reply_to")
        if isinstance(reply_to, str):  # it may be about a request of ours
            return Resolve(reply_to, ResponseBody(reply_to, False, None,
                                                  str(msg.data.get("error")),
                                                  msg.data.get("code")))
        return Handle(msg, reply_on_error=False)
    if kind == MessageType.NOTIFICATION.value:
        return Handle(msg, reply_on_error=False)
    if kind == MessageType.DISCONNECT.value:
        delay = msg.data.get("retry_after")
        ok = isinstance(delay, (int, float)) and not isinstance(delay, bool) and 0 <= delay
        return Leave(str(msg.data.get("reason") or "no reason"),
                     min(float(delay), MAX_RETRY_AFTER) if ok else None)
    if kind == MessageType.CONNECT.value:
        return Ignore("extra 'connect' answer")
    if kind == MessageType.CANCEL.value:
        request_id = msg.data.get("request_id")
        if not isinstance(request_id, str):
            return Ignore("cancel without a request_id")
        return CancelJob(request_id, str(msg.data.get("reason") or "cancelled"))
    if kind == MessageType.CHUNK_ACK.value:
        try:
            body = ChunkBody.from_message(msg)
        except ProtocolError as exc:
            return Ignore(f"unreadable chunk_ack: {exc}")
        return Acked(body.request_id, body.seq)
    if kind == MessageType.ADOPT.value:
        jobs = msg.data.get("jobs")
        if not isinstance(jobs, list):
            return Ignore("adopt without jobs")
        return AdoptJobs([j for j in jobs if isinstance(j, str)])
    if kind in handled:
        return Handle(msg, reply_on_error=True)
    return Reply(Message.error(f"Unknown message type '{kind}'", reply_to=msg.msg_id,
                               code=ErrorCode.BAD_REQUEST))


# ---------------------------------------------------------------------------- the session


class Session:
    """One connection's state and work; made for it, dropped with it.

    What it sends goes through its :class:`~workers.outbox.Outbox`; the requests the
    broker sends run in the worker's :class:`~workers.runner.Runner`, which outlives it.
    """

    def __init__(self, ws: ClientConnection, runner: Runner,
                 handlers: dict[str, list[MessageHandler]], spawn: Spawn,
                 stopping: Callable[[], bool], interval: float) -> None:
        self.ws = ws
        self.handlers = handlers
        #: Starts a task of the worker's (its stop waits for them).
        self.spawn = spawn
        self.stopping = stopping
        self.interval = interval
        self.pending: dict[str, asyncio.Future[ResponseBody]] = {}
        self.last_ping: tuple[str, float] | None = None
        #: What the broker granted of what we asked (its answer to ``connect``).
        self.features: frozenset[Feature] = frozenset()
        #: loop.time() of the last frame from the broker.
        self.heard = 0.0
        #: Seconds the broker asked us to wait before dialling again (its disconnect).
        self.retry_after: float | None = None
        self.outbox = Outbox(ws, self.spawn, self._gathering)
        self.runner = runner

    @property
    def in_flight(self) -> int:
        """Requests of the broker's running (on this connection, or kept from one before)."""
        return self.runner.in_flight

    def _gathering(self) -> bool:
        """Frames wait to go in one batch frame: batches granted, requests running."""
        return Feature.BATCH in self.features and self.in_flight > 0

    # ------------------------------------------------------------------ registration

    async def register(self, registration: Registration) -> dict[str, Any]:
        """Send ``connect``; return the broker's answer (its worker id and interval).

        Raises :class:`RegistrationFailed` with the broker's reason (and close code,
        e.g. 4409 when the id belongs to another credential).
        """
        try:
            await self.ws.send(Message(MessageType.CONNECT.value,
                                       registration.to_data()).to_json())
        except ConnectionClosed:
            pass  # refused at once (credentials): the broker's reason is still to be read
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                while True:
                    try:
                        msg = await self._receive()
                    except ConnectionClosed as exc:
                        raise RegistrationFailed("connection closed before the answer",
                                                 exc.rcvd.code if exc.rcvd else None) from None
                    if msg is None:
                        continue
                    if msg.type == MessageType.CONNECT.value:
                        self._granted(msg.data)
                        return msg.data
                    if msg.type == MessageType.ERROR.value:
                        reason = str(msg.data.get("error") or "no reason given")
                        await self._closed_quietly()
                        code = msg.data.get("code")
                        raise RegistrationFailed(reason, self.ws.close_code,
                                                 code if isinstance(code, str) else None)
                    await self._carry_out(msg)
        except TimeoutError:
            raise RegistrationFailed(
                f"no answer to 'connect' within {REGISTER_TIMEOUT:.0f}s") from None

    def _granted(self, answer: dict[str, Any]) -> None:
        try:
            self.features = Feature.parse(answer.get("features"))
        except ProtocolError:
            self.features = frozenset()
        limit = answer.get("max_message_bytes")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            # Characters, not bytes, are counted while gathering: a quarter is safe.
            self.outbox.batch_limit = min(BATCH_BYTES, limit // 4)
            self.runner.max_answer = 4 * limit
        self.heard = asyncio.get_running_loop().time()

    async def _closed_quietly(self) -> None:
        """Wait a moment for the close that follows a refusal (to read its code)."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.wait_closed()
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ serving

    async def serve(self, stop: asyncio.Event,
                    finish: Callable[[], Coroutine[Any, Any, None]]) -> str:
        """Read, beat and watch for ``stop`` until one of them ends the session.

        On ``stop``: leave gracefully, still reading (requests that come meanwhile are
        refused, answers still arrive), while ``finish`` lets the work in hand end.
        """
        reader = asyncio.create_task(self._read_loop())
        beater = asyncio.create_task(self._heartbeat_loop())
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({reader, beater, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                await self._leave(finish)
                return "stopped"
            return reader.result() if reader in done else beater.result()
        finally:
            for task in (reader, beater, stopper):
                task.cancel()
            await asyncio.gather(reader, beater, stopper, return_exceptions=True)
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost("Connection to the broker lost"))

    async def _leave(self, finish: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Graceful stop on a live connection: say goodbye, let work finish, close."""
        logger.info("Stopping: leaving the broker, %d request(s) in flight", self.in_flight)
        await self.outbox.send(Message(MessageType.DISCONNECT.value,
                                       {"reason": "worker stopping"}).to_json())
        await finish()
        await self.ws.close()

    async def _read_loop(self) -> str:
        """Hand every frame to its reaction; return why the connection ended."""
        quiet = Feature.QUIET_HEARTBEAT in self.features
        while True:
            dead_after = (QUIET_DEAD_AFTER if quiet else DEAD_AFTER_MISSES) * self.interval
            try:
                async with asyncio.timeout(dead_after):
                    msgs = await self._receive_all()
            except TimeoutError:
                logger.warning("Nothing from the broker for %.1fs; dropping the connection",
                               dead_after)
                await self.ws.close()
                return "broker silent"
            except ConnectionClosed as exc:
                return f"connection closed ({describe(exc)})"
            for msg in msgs:
                if await self._carry_out(msg):
                    await self.ws.close()
                    return "broker sent disconnect"

    async def _receive_all(self) -> list[Message]:
        """The next frame's envelopes: one, several (a batch, if granted), or none (a
        frame that does not parse, already answered with an error)."""
        raw = await self.ws.recv()
        self.heard = asyncio.get_running_loop().time()
        if Feature.BATCH not in self.features or raw[:1] not in ("[", b"["):
            msg = self._parse(raw)
            return [] if msg is None else [msg]
        try:
            frames = loads_frames(raw)
        except ProtocolError as exc:
            await self._unreadable(exc)
            return []
        msgs = []
        for parsed in batch_messages(frames):
            if isinstance(parsed, ProtocolError):
                await self._unreadable(parsed)
            else:
                msgs.append(parsed)
        return msgs

    async def _receive(self) -> Message | None:
        """Next frame, or None for one that does not parse (already answered with an error)."""
        return self._parse(await self.ws.recv())

    def _parse(self, raw: str | bytes) -> Message | None:
        try:
            return Message.from_json(raw)
        except ProtocolError as exc:
            self.spawn(self._unreadable(exc))
            return None

    async def _unreadable(self, exc: ProtocolError) -> None:
        logger.warning("Unreadable frame from the broker: %s", exc)
        await self.outbox.send(Message.error(f"Unreadable frame: {exc}",
                                             code=ErrorCode.BAD_REQUEST).to_json())

    async def _carry_out(self, msg: Message) -> bool:
        """Do what :func:`react` says; True when the session must end (Leave)."""
        reaction = react(msg, stopping=self.stopping(), handled=self.handlers.keys(),
                         in_flight=self.in_flight)
        if isinstance(reaction, Reply):
            await self.outbox.send(reaction.message.to_json())
        elif isinstance(reaction, Run):
            self.runner.start(reaction.request_id, reaction.body)
        elif isinstance(reaction, CancelJob):
            self.runner.cancel(reaction.request_id, reaction.reason)
        elif isinstance(reaction, Acked):
            self.runner.acked(reaction.request_id, reaction.seq)
        elif isinstance(reaction, AdoptJobs):
            await self.runner.adopted(reaction.request_ids)
        elif isinstance(reaction, Resolve):
            self._resolve(reaction)
        elif isinstance(reaction, Handle):
            self._run_handlers(reaction.message, reply_on_error=reaction.reply_on_error)
        elif isinstance(reaction, Leave):
            logger.warning("Broker is going away: %s%s", reaction.reason,
                           "" if reaction.retry_after is None else
                           f"; coming back in {reaction.retry_after:.1f}s, as it asks")
            self.retry_after = reaction.retry_after
            return True
        elif reaction.why == "heartbeat ack" and self.last_ping is not None and \
                msg.data.get("ack") == self.last_ping[0]:
            logger.debug("Heartbeat round trip %.1f ms",
                         (asyncio.get_running_loop().time() - self.last_ping[1]) * 1000)
        return False

    def _resolve(self, reaction: Resolve) -> None:
        future = self.pending.get(reaction.request_id)
        if future is not None and not future.done():
            future.set_result(reaction.body)
        elif reaction.body.error is not None and not reaction.body.success:
            logger.warning("Error from the broker: %s (about %s)", reaction.body.error,
                           reaction.request_id)

    # ------------------------------------------------------------------ our requests

    async def ask(self, msg: Message) -> ResponseBody:
        """Send a request of ours and wait for the broker's ``response`` to it."""
        future: asyncio.Future[ResponseBody] = asyncio.get_running_loop().create_future()
        self.pending[msg.msg_id] = future
        try:
            if not await self.outbox.send(msg.to_json()):
                raise ConnectionLost("Connection to the broker lost")
            return await future
        finally:
            self.pending.pop(msg.msg_id, None)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self) -> str:
        """Tell the broker we are alive and how busy; the broker acks each beat (with
        quiet heartbeats: only the beats that ask, after a silence)."""
        loop = asyncio.get_running_loop()
        quiet = Feature.QUIET_HEARTBEAT in self.features
        while True:
            await asyncio.sleep(self.interval)
            ask = quiet and loop.time() - self.heard >= ASK_AFTER_MISSES * self.interval - 0.5
            ping = Message.heartbeat(in_flight=self.in_flight, want_ack=ask)
            self.last_ping = (ping.msg_id, loop.time())
            if not await self.outbox.send(ping.to_json()):
                return "heartbeat could not be sent"

    # ------------------------------------------------------------------ custom handlers

    def _run_handlers(self, msg: Message, *, reply_on_error: bool) -> None:
        if msg.type == MessageType.NOTIFICATION.value:
            logger.info("Notification from the broker: %s", msg.data.get("message"))
        elif msg.type == MessageType.ERROR.value:
            logger.warning("Error from the broker: %s", msg.data.get("error"))
        for func in self.handlers.get(msg.type, ()):
            self.spawn(self._call_handler(func, msg, reply_on_error))

    async def _call_handler(self, func: MessageHandler, msg: Message,
                            reply_on_error: bool) -> None:
        try:
            if inspect.iscoroutinefunction(func):
                result = await func(msg)
            else:
                result = await asyncio.to_thread(func, msg)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            logger.exception("Handler %s for '%s' frames failed",
                             getattr(func, "__name__", func), msg.type)
            if reply_on_error:
                await self.outbox.send(Message.error(f"Handler for '{msg.type}' failed: "
                                                     f"{describe(exc)}", reply_to=msg.msg_id,
                                                     code=ErrorCode.HANDLER_FAILED).to_json())
            return
        if isinstance(result, Message):
            await self.outbox.send(result.to_json())
