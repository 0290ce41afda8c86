"""The worker socket: frames in, frames out. The broker's decisions are in its link.

Each frame is parsed (:mod:`workers.protocol`) and handed to the connection's
:class:`~dispatch.core.links.WorkerLink` (registration, heartbeats, answers) or to
the broker's server actions; what goes back is sent through the bounded outbox of
:class:`~.sockets.BaseSocket`.
"""

from __future__ import annotations

import logging

from workers.handlers import run_safely
from workers.protocol import (ChunkBody, ErrorCode, Feature, Message, MessageType,
                              ProgressBody, ProtocolError, Registration, RequestBody,
                              ResponseBody, quote)

from workers import protocol

from .. import conf
from ..control.actions import Caller, actions, message_handlers
from ..core.dispatcher import get_dispatcher
from ..core.events import Departure
from ..core.links import WorkerLink
from ..core.metering import meter
from ..history import get_recorder
from ..registry import RegistryUnavailable
from .sockets import BaseSocket, SocketState, parse

log = logging.getLogger("dispatch.sockets")


class WorkerConsumer(BaseSocket):
    """One worker's socket."""

    kind = "worker"
    link: WorkerLink | None = None

    async def connect(self) -> None:
        dispatcher = await get_dispatcher()
        if await self.admit() and dispatcher.handing_over:
            await self.turn_away()  # it would be sent away again at once
        elif self.state is SocketState.OPEN:
            self.link = WorkerLink(self, dispatcher.workers, self.grant, get_recorder())
            dispatcher.workers.add(self.link)

    async def disconnect(self, code: int) -> None:
        self.forget_grant()
        if self.link is not None:
            await self.link.teardown(f"disconnected ({code})", Departure.DROPPED)

    async def revoke(self, reason: str) -> None:
        await self.refuse(reason, None, ErrorCode.UNAUTHORIZED)
        if self.link is not None:
            await self.link.close(protocol.CloseCode.UNAUTHORIZED, reason)

    async def cut_off(self) -> None:
        if self.link is not None:
            await self.link.teardown("too slow to read")

    def unsent_allowance(self) -> int:
        """What the worker was sent to run may wait for it, and a few MB beside."""
        assigned = self.link.held.chars if self.link is not None else 0
        return conf.get("MAX_UNSENT_BYTES") + assigned

    async def receive_text(self, text: str) -> None:
        link = self.link
        assert link is not None
        link.heard()
        if Feature.BATCH in link.features and protocol.is_batch(text):
            try:  # as a single frame: the broker's own commands compute on their numbers
                frames = await parse(protocol.loads_frames, text,
                                     relay='"request"' not in text)
            except ProtocolError as exc:
                await self.refuse(str(exc))
                return
            if not self.within_rate(len(frames) - 1):  # each envelope counts as a frame
                await self.rate_limited()
                return
            for parsed in protocol.batch_messages(frames):
                if self.state is not SocketState.OPEN:
                    return
                if isinstance(parsed, ProtocolError):
                    await self.refuse(str(parsed))
                else:
                    await self.handle(link, parsed)
            return
        try:
            # The broker's own commands (a worker's request) compute on their numbers.
            msg = await parse(Message.from_json, text, relay='"request"' not in text[:64] or
                              protocol.peek(text, "type") != MessageType.REQUEST.value)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        await self.handle(link, msg)

    async def handle(self, link: WorkerLink, msg: Message) -> None:
        """One envelope, alone in its frame or one of a batch."""
        if msg.type != MessageType.CONNECT.value and link.entry is None:
            await self.refuse("Register first: send a 'connect' frame", msg.msg_id)
            return
        try:
            handler = self.FRAME_HANDLERS.get(msg.type)
            if handler is not None:
                await handler(self, link, msg)
            elif msg.type in message_handlers:
                await message_handlers[msg.type](self, msg)
            else:
                await self.refuse(f"Unknown message type '{quote(msg.type)}'", msg.msg_id)
        except ProtocolError as exc:
            await self.refuse(str(exc), msg.msg_id)
        except RegistryUnavailable as exc:
            log.warning("worker %s: %s", link.label, exc)
            await self.refuse(f"{protocol.BROKER_UNAVAILABLE}: {exc}", msg.msg_id,
                              ErrorCode.BROKER_UNAVAILABLE)

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        meter.refused_frames[(self.kind, code.value)] += 1
        if self.link is not None:  # else refused at the door: said there, within a budget
            self.logs.log(log, logging.INFO, "worker %s: refused a frame: %s",
                          self.link.label, quote(error, 300))
        await self.send_frame(Message.error(error, reply_to=request_id, code=code))

    async def too_large(self, text: str, size: int, limit: int) -> None:
        """An answer too large to pass on fails its request at once (see the link). Its
        ids are read from the frame's start, not parsed out of megabytes."""
        msg_id, request_id = protocol.peek(text, "msg_id"), protocol.peek(text, "request_id")
        if protocol.peek(text, "type") == MessageType.RESPONSE.value and request_id and \
                self.link is not None and self.link.entry is not None and \
                await self.link.fail(request_id, msg_id, f"{protocol.ANSWER_TOO_LARGE}: "
                                     f"{size} bytes > limit {limit}", ErrorCode.TOO_LARGE):
            return
        await self.refuse(f"Message too large: {size} bytes (limit {limit})", msg_id,
                          ErrorCode.TOO_LARGE)

    async def send_frame(self, msg: Message) -> None:
        await self.send_text(msg.to_json())

    # ------------------------------------------------------------------ frames

    async def on_connect(self, link: WorkerLink, msg: Message) -> None:
        if link.entry is not None:
            raise ProtocolError("Already registered on this connection")
        try:
            reg = Registration.from_data(msg.data)
        except ProtocolError as exc:
            await self.refuse(f"Bad registration: {exc}", msg.msg_id)
            await self.close(protocol.CloseCode.BAD_REGISTRATION)
            return
        await link.register(reg, msg.msg_id)

    async def on_heartbeat(self, link: WorkerLink, msg: Message) -> None:
        await link.heartbeat(msg)

    async def on_response(self, link: WorkerLink, msg: Message) -> None:
        """The worker's answer. One that names its request but is otherwise malformed
        still ends that request (as a failure), so its requester does not wait for the
        timeout; the worker is told what was wrong."""
        try:
            body = ResponseBody.from_message(msg)
        except ProtocolError as exc:
            request_id = msg.data.get("request_id")
            if not isinstance(request_id, str) or request_id not in link.held:
                raise  # about no request of its: refused like any bad frame
            await link.answer(ResponseBody(request_id, False, None, f"Malformed answer from "
                                           f"the worker: {exc}", ErrorCode.WORKER_ERROR.value),
                              msg.msg_id)
            await self.refuse(str(exc), msg.msg_id)
            return
        await link.answer(body, msg.msg_id)

    async def on_request(self, link: WorkerLink, msg: Message) -> None:
        """A worker asks the broker itself (server actions); answers are bounded too."""
        body = RequestBody.from_message(msg)
        caller = Caller(self.grant.owner, link.entry.worker_id)  # type: ignore[union-attr]
        outcome = await run_safely(actions, body.action, body.params, caller)
        try:
            text = Message.response(msg.msg_id, outcome.ok, outcome.data, outcome.error,
                                    outcome.code).to_json()
        except (TypeError, ValueError) as exc:  # an int of 8,600 digits, say
            text = Message.response(msg.msg_id, False, None,
                                    f"Result is not JSON serializable: {exc}",
                                    ErrorCode.NOT_SERIALIZABLE).to_json()
        limit = conf.get("MAX_MESSAGE_BYTES")
        if len(text) > limit:
            text = Message.response(msg.msg_id, False, None, f"Answer too large: {len(text)} "
                                    f"bytes (limit {limit})", ErrorCode.TOO_LARGE).to_json()
        await self.send_text(text)

    async def on_disconnect(self, link: WorkerLink, msg: Message) -> None:
        """The worker is leaving: no new work; it closes once its requests are done."""
        log.info("worker %s is draining before it leaves", link.label)
        await link.stop_taking_work()

    async def on_progress(self, link: WorkerLink, msg: Message) -> None:
        await link.progress(ProgressBody.from_message(msg))

    async def on_chunk(self, link: WorkerLink, msg: Message) -> None:
        await link.chunk(ChunkBody.from_message(msg))

    async def on_notification(self, link: WorkerLink, msg: Message) -> None:
        self.logs.log(log, logging.INFO, "worker %s says: %s", link.label,
                      quote(msg.data.get("message"), 300))

    async def on_error(self, link: WorkerLink, msg: Message) -> None:
        self.logs.log(log, logging.WARNING, "worker %s reported an error: %s", link.label,
                      quote(msg.data.get("error"), 300))

    FRAME_HANDLERS = {
        MessageType.CONNECT.value: on_connect,
        MessageType.HEARTBEAT.value: on_heartbeat,
        MessageType.RESPONSE.value: on_response,
        MessageType.REQUEST.value: on_request,
        MessageType.DISCONNECT.value: on_disconnect,
        MessageType.PROGRESS.value: on_progress,
        MessageType.CHUNK.value: on_chunk,
        MessageType.NOTIFICATION.value: on_notification,
        MessageType.ERROR.value: on_error,
    }
