"""The requester socket: the seed's JSON API, many requests in flight at once.

Each request is checked against the connection's limits and grant, then submitted
to the process's dispatcher, which answers it exactly once (:meth:`answer`). The
opt-in frames of long jobs are handled here too: ``{"cancel": id}``,
``{"attach": id}``, and, for requests that asked (``"stream": true``), their
progress and chunk events (:meth:`event`). A frame may hold several of them (a JSON
array, a batch); a requester that sends batches gets its answers in batches too.

Back-pressure: a chunk is acknowledged to its worker only once this socket has
room for more (less than half of ``MAX_UNSENT_BYTES`` unread), so a requester that
reads slowly slows its workers down instead of filling the broker; progress
reports that queue up behind a slow reader are merged, the newest wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from workers import protocol
from workers.protocol import (ApiRequest, ApiResponse, Attach, Cancel, ErrorCode,
                              ProtocolError, quote, requester_frame, requester_object)

from .. import conf
from ..balancing import selector
from ..core.dispatcher import Dispatcher, get_dispatcher
from ..core.requests import over_limits
from ..core.metering import meter
from .sockets import BaseSocket, SocketState, parse, take_turns

Ack = Callable[[], Awaitable[None]]

#: How often a socket with chunks waiting to be acknowledged looks whether its peer
#: has read enough.
ACK_POLL_SECONDS = 0.02


class RequesterConsumer(BaseSocket):
    """A requester's socket."""

    kind = "requester"
    dispatcher: Dispatcher

    async def connect(self) -> None:
        self.dispatcher = await get_dispatcher()
        self.in_flight: dict[str, tuple[str, int]] = {}  # request_id -> (key, frame size)
        self.in_flight_bytes = 0
        self.watching: set[str] = set()  # request ids attached to (not sent from here)
        self.held_acks: list[tuple[Ack, int]] = []  # chunk acks waiting for the peer to read
        self.held_ack_bytes = 0  # and the size of those chunks
        self._telling: set[asyncio.Task[None]] = set()  # accepted events to come
        #: request id -> the commit that stores it, for requests that asked "accepted":
        #: an answer that comes sooner waits for it (it never overtakes its row).
        self._storing: dict[str, asyncio.Future[None]] = {}
        self._acker: asyncio.Task[None] | None = None
        self.batching = False  # it sent a batch frame: its answers go in batches too
        admitted = await self.admit()
        self.pool = self.grant.pool_labels if admitted else {}  # selected by each request
        if admitted and self.dispatcher.handing_over:
            await self.turn_away()

    async def disconnect(self, code: int) -> None:
        self.forget_grant()
        if self._acker is not None:
            self._acker.cancel()
        await self.cut_off()

    async def cut_off(self) -> None:
        """It stops watching its requests; they go on, and their answers are kept for
        a new connection of the same credential to attach to."""
        self.dispatcher.unwatch([key for key, _ in self.in_flight.values()], self,
                                self.grant.owner if self.watching else "", self.watching)
        self.in_flight.clear()
        self.watching.clear()
        self.in_flight_bytes = 0

    async def receive_text(self, text: str) -> None:
        if protocol.is_batch(text):
            await self._receive_batch(text)
            return
        try:
            frame = await parse(requester_frame, text)
        except ProtocolError as exc:
            await self.refuse(str(exc), exc.request_id)
            return
        await self._handle(frame, protocol.parsed_size(text))

    async def _receive_batch(self, text: str) -> None:
        """Frames sent as one (a JSON array), each handled as if it came alone, in order.
        From now on this peer's answers are gathered into batch frames too: a frame less
        each way per request is most of what a request costs the server."""
        try:
            objects = await parse(protocol.loads_frames, text)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        if not self.within_rate(len(objects) - 1):  # each counts as a frame
            await self.rate_limited()
            return
        self.batching = True
        for obj in objects:
            await take_turns()  # a batch holds the loop no longer than a run of frames
            if self.state is not SocketState.OPEN:
                return
            try:
                if not isinstance(obj, dict):
                    raise ProtocolError("Each frame of a batch must be a JSON object")
                frame = requester_object(obj)
            except ProtocolError as exc:
                await self.refuse(str(exc), exc.request_id)
                continue
            await self._handle(frame, _size(obj))

    async def _handle(self, frame: ApiRequest | Cancel | Attach, size: int) -> None:
        if isinstance(frame, Cancel):
            await self._cancel(frame)
        elif isinstance(frame, Attach):
            await self._attach(frame)
        else:
            await self._submit(frame, size)

    async def _out(self, text: str) -> None:
        """An answer or a refusal: in a batch frame to a peer that sends them."""
        if self.batching:
            self.gather(text)
        else:
            await self.send_text(text)

    @property
    def requester(self) -> str:
        """Who sent it, for the history: the credential's name and the peer's address."""
        grant = self.grant
        return f"{grant.name[:40]}@{self.peer}" if grant.credential_id else str(self.peer)

    async def _submit(self, request: ApiRequest, size: int) -> None:
        if self.dispatcher.handing_over:  # its requests go elsewhere: so must this one
            await self.turn_away()
            return
        if not self.grant.allows(request.command):
            await self.refuse(f"Command '{quote(request.command)}' is not allowed for this "
                              "API key", request.request_id, ErrorCode.NOT_ALLOWED)
            return
        if request.timeout is not None and request.timeout > conf.get("MAX_TIMEOUT"):
            await self.refuse(f"Field 'timeout' is over this broker's limit of "
                              f"{conf.get('MAX_TIMEOUT'):g} seconds", request.request_id)
            return
        beyond = over_limits(request.not_before, request.keep)
        if beyond:
            await self.refuse(beyond, request.request_id)
            return
        if len(self.in_flight) >= conf.get("MAX_IN_FLIGHT"):
            await self.refuse(f"Too many requests in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT')})", request.request_id,
                              ErrorCode.LIMIT_EXCEEDED)
            return
        if self.in_flight_bytes + size > conf.get("MAX_IN_FLIGHT_BYTES"):
            await self.refuse(f"Too much data in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT_BYTES')} bytes of requests as they "
                              "cost parsed): wait for answers first", request.request_id,
                              ErrorCode.LIMIT_EXCEEDED)
            return
        if request.request_id in self.in_flight:
            await self.refuse(f"Duplicate request_id '{quote(request.request_id)}': a request "
                              "with this id is still in flight", request.request_id,
                              ErrorCode.DUPLICATE)
            return
        self.watching.add(request.request_id)
        if await self.dispatcher.lookup.rejoin(self.grant.owner, request.request_id, self,
                                        request.stream):
            # Sent again (the first may have been lost with a connection): the same job,
            # not a second run; its answer (kept or to come) is the answer to this one.
            if request.accepted and request.request_id in self.watching:  # still running
                self._tell_accepted(request.request_id, None)
            return
        self.watching.discard(request.request_id)
        held = self.dispatcher.table.held  # a new job (not one sent again): it must fit
        if held.requests[self.grant.owner] >= conf.get("MAX_PENDING") or \
                held.bytes[self.grant.owner] + size > conf.get("MAX_PENDING_BYTES"):
            await self.refuse(f"Too many requests pending for this credential (limits "
                              f"{conf.get('MAX_PENDING')} requests, "
                              f"{conf.get('MAX_PENDING_BYTES')} bytes, whatever the "
                              "connections): wait for answers first", request.request_id,
                              ErrorCode.LIMIT_EXCEEDED)
            return
        key = protocol.new_id()
        self.in_flight[request.request_id] = (key, size)
        self.in_flight_bytes += size
        await self.dispatcher.submit(
            request.command, request.data, self, request_id=request.request_id,
            requester=self.requester, timeout=request.timeout, key=key,
            owner=self.grant.owner, stream=request.stream,
            priority=min(request.priority, self.grant.max_priority),
            select=selector({**request.select, **self.pool} if self.pool else request.select),
            affinity=request.affinity,
            hedge=request.hedge, traceparent=request.traceparent or "", cost=size,
            not_before=request.not_before, wait_for_workers=request.wait_for_workers,
            keep=request.keep or 0.0, task=request.task or "")
        if request.accepted and request.request_id in self.in_flight:
            self._tell_accepted(request.request_id, key)

    def _tell_accepted(self, request_id: str, key: str | None) -> None:
        """Send ``accepted`` once the job store has the request (its answer instead, if
        that came first: what reads the row then finds it). ``key`` None: a request sent
        again, joined to the one running."""
        async def when_stored() -> None:
            await committed
            if self._storing.get(request_id) is committed:
                del self._storing[request_id]
            if (self.in_flight.get(request_id, ("",))[0] == key if key is not None
                    else request_id in self.watching):
                await self._out(protocol.event(request_id, "accepted"))

        committed = self._storing[request_id] = self.dispatcher.keeper.committed()
        self._later(when_stored())

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _cancel(self, frame: Cancel) -> None:
        """Cancel a request of this credential; its answer (``cancelled``) says it is done."""
        if not await self.dispatcher.lookup.cancel(self.grant.owner, frame.request_id,
                                            "cancelled by the requester"):
            await self.refuse(f"No request '{quote(frame.request_id)}' of yours is running",
                              frame.request_id, ErrorCode.UNKNOWN_REQUEST)

    async def _attach(self, frame: Attach) -> None:
        """Watch a request this credential sent on another connection (or on this one
        before it dropped): its remaining progress and its answer, or its kept answer.
        At most MAX_IN_FLIGHT at once, as for requests sent."""
        if len(self.watching) >= conf.get("MAX_IN_FLIGHT") and \
                frame.request_id not in self.watching:
            await self.refuse(f"Too many requests attached to ({len(self.watching)}; limit "
                              f"{conf.get('MAX_IN_FLIGHT')}): wait for their answers first",
                              frame.request_id, ErrorCode.LIMIT_EXCEEDED)
            return
        self.watching.add(frame.request_id)
        if not await self.dispatcher.lookup.attach(self.grant.owner, frame.request_id, self,
                                            frame.stream):
            self.watching.discard(frame.request_id)
            await self.refuse(f"No request '{quote(frame.request_id)}' of yours is running "
                              "or finished lately", frame.request_id, ErrorCode.UNKNOWN_REQUEST)

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        meter.refused_frames[(self.kind, code.value)] += 1
        await self._out(ApiResponse.failure(request_id, error, code).to_json())

    async def too_large(self, text: str, size: int, limit: int) -> None:
        """Refused, with its request_id when it is near the start (it is not parsed: a
        refusal must cost next to nothing), so the caller can match it. A batch frame is
        refused whole, with none: the ids of its other requests are not known, and the
        first one's would say that it alone was refused."""
        request_id = None if protocol.is_batch(text) else protocol.peek(text, "request_id")
        await self.refuse(f"Message too large: {size} bytes (limit {limit})",
                          request_id if request_id and len(request_id) <= protocol.MAX_ID_CHARS
                          else None, ErrorCode.TOO_LARGE)

    # ------------------------------------------------------------------ as a sink

    async def answer(self, response: ApiResponse, text: str) -> None:
        """A request's one answer (called by the dispatcher)."""
        held = self.in_flight.pop(response.request_id, None)  # type: ignore[arg-type]
        if held is not None:
            self.in_flight_bytes -= held[1]
        elif response.request_id not in self.watching:
            return
        self.watching.discard(response.request_id)  # type: ignore[arg-type]
        storing = self._storing.pop(response.request_id, None)  # type: ignore[arg-type]
        if storing is not None and not storing.done():
            self._later(self._send_once(storing, text))
            return
        await self._out(text)

    async def _send_once(self, stored: asyncio.Future[None], text: str) -> None:
        await stored
        await self._out(text)

    async def event(self, request_id: str, text: str, *, ack: Ack | None = None,
                    mergeable: bool = False) -> None:
        """A progress (``mergeable``) or chunk event of a request that asked for them. A
        chunk is acknowledged once this peer has room; until then its worker waits (at
        most CHUNK_WINDOW chunks: one that does not wait has its request failed), and
        the chunk counts beside MAX_UNSENT_BYTES (:meth:`unsent_allowance`)."""
        hold = ack is not None and (bool(self.held_acks) or not self._has_room())
        if hold:
            self.held_acks.append((ack, len(text)))  # type: ignore[arg-type]
            self.held_ack_bytes += len(text)
            if self._acker is None:
                self._acker = asyncio.get_running_loop().create_task(self._release_acks())
        await self.send_text(text, merge_key=request_id if mergeable else None)
        if ack is not None and not hold:
            await ack()

    def unsent_allowance(self) -> int:
        """Chunks whose workers wait for this peer to read may wait unread too."""
        return conf.get("MAX_UNSENT_BYTES") + self.held_ack_bytes

    def _has_room(self) -> bool:
        return self.probe.unsent() + self.outbox_bytes < conf.get("MAX_UNSENT_BYTES") // 2

    async def _release_acks(self) -> None:
        """Acknowledge the held chunks as the peer reads: its workers wait meanwhile."""
        try:
            while self.held_acks:
                while not self._has_room():
                    await asyncio.sleep(ACK_POLL_SECONDS)
                acks, self.held_acks = self.held_acks, []
                for ack, size in acks:
                    self.held_ack_bytes -= size
                    await ack()
        finally:
            self._acker = None


def _size(obj: dict[str, Any]) -> int:
    """What one request of a batch costs parsed: its own size, not a share of the
    frame's (one big request among small ones that finish at once would otherwise hold
    its bytes almost uncounted)."""
    try:  # (dumps tries orjson first, then the exact encoder for what orjson cannot write)
        text = protocol.dumps(obj)
    except (TypeError, ValueError):
        text = str(obj)
    return protocol.parsed_size(text)
