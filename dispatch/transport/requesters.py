"""The requester socket: the seed's JSON API, many requests in flight at once.

Each request is checked against the connection's limits and grant, then submitted
to the process's dispatcher, which answers it exactly once through :meth:`respond`.
"""

from __future__ import annotations

from workers import protocol
from workers.protocol import ApiRequest, ApiResponse, ErrorCode, ProtocolError, quote

from .. import conf
from ..core.dispatcher import Dispatcher, get_dispatcher
from .sockets import BaseSocket


class RequesterConsumer(BaseSocket):
    """A requester's socket."""

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
                              "API key", request.request_id, ErrorCode.NOT_ALLOWED)
            return
        if len(self.in_flight) >= conf.get("MAX_IN_FLIGHT"):
            await self.refuse(f"Too many requests in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT')})", request.request_id,
                              ErrorCode.LIMIT_EXCEEDED)
            return
        if self.in_flight_bytes + len(text) > conf.get("MAX_IN_FLIGHT_BYTES"):
            await self.refuse(f"Too much data in flight on this connection (limit "
                              f"{conf.get('MAX_IN_FLIGHT_BYTES')} bytes of requests): wait "
                              "for answers first", request.request_id, ErrorCode.LIMIT_EXCEEDED)
            return
        if request.request_id in self.in_flight:
            await self.refuse(f"Duplicate request_id '{quote(request.request_id)}': a request "
                              "with this id is still in flight", request.request_id,
                              ErrorCode.DUPLICATE)
            return
        key = protocol.new_id()
        self.in_flight[request.request_id] = (key, len(text))
        self.in_flight_bytes += len(text)
        await self.dispatcher.submit(
            request.command, request.data, self.respond, request_id=request.request_id,
            requester=str(self.peer), timeout=request.timeout, key=key)

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        await self.send_text(ApiResponse.failure(request_id, error, code).to_json())

    async def too_large(self, text: str, size: int, limit: int) -> None:
        """Refused, with its request_id when it can be read, so the caller can match it."""
        try:
            request_id = protocol.loads_object(text).get("request_id")
        except ProtocolError:
            request_id = None
        await self.refuse(f"Message too large: {size} bytes (limit {limit})",
                          request_id if isinstance(request_id, str)
                          and len(request_id) <= protocol.MAX_ID_CHARS else None,
                          ErrorCode.TOO_LARGE)

    async def respond(self, response: ApiResponse) -> None:
        """Called by the dispatcher, once per request."""
        held = self.in_flight.pop(response.request_id, None)  # type: ignore[arg-type]
        if held is not None:
            self.in_flight_bytes -= held[1]
            await self.send_text(response.to_json())
