"""The live dashboard's socket (``/ws/dashboard/``): snapshots out, operator actions in.

Who may watch: a staff user of the admin (session cookie), the holder of an admin
key (sent as the first frame, ``{"type": "auth", "key": "..."}``, so that it is in
no URL and no log), or, in protected mode, a direct loopback peer. The
credential is checked again every few seconds, so revoking a key, ending a staff
account or leaving protected mode closes open dashboards.

Actions (``drain``, ``undrain``, ``cancel``) come over the same socket. A page of
another site could open this socket with the visitor's session cookie, so a
browser's ``Origin`` must be the broker's own (or listed in ALLOWED_ORIGINS):
that, not a CSRF token, is what keeps actions to the broker's own page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import import_module
from typing import Any, ClassVar
from urllib.parse import urlsplit

import orjson
from channels.auth import get_user
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from workers import protocol
from workers.protocol import CloseCode, ErrorCode, ProtocolError

from ..auth import get_guard, header, origin_listed
from ..control import services
from ..control.fleetview import get_feed, snapshot
from ..core.dispatcher import get_dispatcher
from ..core.metering import meter
from .sockets import REFUSAL_LOG, BaseSocket, SocketState

log = logging.getLogger("dispatch.dashboard")

#: Seconds a socket may stay open without proving who it is.
AUTH_SECONDS = 10.0
#: Seconds between checks that the credential still admits the socket.
RECHECK_SECONDS = 5.0
#: Sockets of the process that may wait for their key at once, and of those, from one
#: peer address: a flood is turned away at once instead of each holding memory for
#: AUTH_SECONDS, and one peer cannot take every place and lock operators out.
MAX_UNAUTHENTICATED = 256
MAX_UNAUTHENTICATED_PER_PEER = 4


class DashboardSocket(BaseSocket):
    kind = "dashboard"
    how: str | None = None  # "session", "key" or "protected" once admitted
    key: str = ""
    operator = "an operator"  # who it admitted, for the record of what they did
    checked = 0.0
    _deadline: asyncio.TimerHandle | None = None  # closes it if no key comes in time
    _closing: asyncio.Task[None] | None = None
    #: Of the process, those yet to send a key, oldest first (a dict: an ordered set).
    waiting: ClassVar[dict[DashboardSocket, None]] = {}

    async def connect(self) -> None:
        await self.accept()
        origin = header(self.scope.get("headers", ()), b"origin")
        if origin is not None and not (self._same_origin(origin) or origin_listed(origin)):
            await self._fail("Origin not allowed: add it to BROKER_ALLOWED_ORIGINS",
                             CloseCode.FORBIDDEN)
            return
        self.state = SocketState.OPEN  # its frames are read, but only ``auth`` until admitted
        self.how = await self._ambient()
        if self.how is not None:
            await self._start()
        elif sum(s.peer.host == self.peer.host
                 for s in DashboardSocket.waiting) >= MAX_UNAUTHENTICATED_PER_PEER:
            await self._fail("Too many dashboards are waiting to log in; try again later",
                             CloseCode.TOO_MANY_CONNECTIONS)
        else:
            if len(DashboardSocket.waiting) >= MAX_UNAUTHENTICATED:
                # Full (a flood from many addresses): the one that waited longest goes.
                # An operator's page sends its key as soon as it is asked, so a flood
                # must outrun that to keep it out.
                oldest = next(iter(DashboardSocket.waiting))
                await oldest._fail("Too many dashboards are waiting to log in; try again "
                                   "later", CloseCode.TOO_MANY_CONNECTIONS)
            DashboardSocket.waiting[self] = None
            await self.send_text('{"type": "auth_required"}')
            self._deadline = asyncio.get_running_loop().call_later(AUTH_SECONDS,
                                                                   self._auth_timeout)

    def _same_origin(self, origin: str) -> bool:
        """The page is the broker's own: its Origin is this Host, and the Host is one
        of ALLOWED_HOSTS (else a rebound DNS name would count as the broker's own)."""
        host = header(self.scope.get("headers", ()), b"host")
        return host is not None and urlsplit(origin).netloc == host and \
            validate_host(split_domain_port(host)[0], settings.ALLOWED_HOSTS)

    async def _ambient(self) -> str | None:
        """What admits this socket without a key: a staff session, or protected mode.

        The session is read from its store each time, not from the copy loaded at
        connect: a logout (or an expiry) deletes it there, and must end the dashboard."""
        session = self.scope.get("session")
        key = getattr(session, "session_key", None) if session is not None else None
        if key:
            store = import_module(settings.SESSION_ENGINE).SessionStore(key)
            user = await get_user({"session": store})
            if user.is_active and user.is_staff:
                self.operator = f"staff user '{user.get_username()}'"
                return "session"
        guard = await get_guard()
        if guard.protected_mode and self.peer.local:
            self.operator = "a loopback peer (protected mode)"
            return "protected"
        return None

    async def _still_admitted(self) -> bool:
        if self.how == "key":
            return (await get_guard()).check_api_token(self.key)
        return await self._ambient() == self.how

    async def _start(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        DashboardSocket.waiting.pop(self, None)
        self.checked = time.monotonic()
        await self.send_text(orjson.dumps(await snapshot(await get_dispatcher())).decode())
        (await get_feed()).subscribe(self.push)

    async def push(self, text: str) -> None:
        """The feed's call, once a second: the snapshot, if the credential still holds."""
        if self.state is not SocketState.OPEN:
            await self._leave()
            return
        if time.monotonic() - self.checked > RECHECK_SECONDS:
            self.checked = time.monotonic()
            if not await self._still_admitted():
                await self._fail("Your credential no longer admits this dashboard",
                                 CloseCode.UNAUTHORIZED)
                return
        await self.send_text(text)

    def _auth_timeout(self) -> None:
        if self.how is None and self.state is SocketState.OPEN:
            self._closing = asyncio.get_running_loop().create_task(
                self._fail("No credential in time", CloseCode.UNAUTHORIZED))

    async def _fail(self, error: str, code: CloseCode) -> None:
        await self.refuse(error, None, _ERRORS.get(code, ErrorCode.NOT_ALLOWED))
        await self._leave()
        await self.close(code)

    async def disconnect(self, code: int) -> None:
        await self._leave()

    async def _leave(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        DashboardSocket.waiting.pop(self, None)
        (await get_feed()).unsubscribe(self.push)

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        meter.refused_frames[(self.kind, code.value)] += 1
        await self.send_text(orjson.dumps({"type": "error", "error": error,
                                           "code": code.value}).decode())

    async def receive_text(self, text: str) -> None:
        try:
            frame = protocol.loads_object(text)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        kind = frame.get("type")
        if self.how is None:
            key = frame.get("key")
            operator = (await get_guard()).operator(key) \
                if kind == "auth" and isinstance(key, str) and key else None
            if operator is not None:
                self.how, self.key, self.operator = "key", key, operator
                await self._start()
            else:
                REFUSAL_LOG.log(log, logging.INFO, "dashboard from %s: wrong or no key",
                                self.peer)
                await self._fail(
                    "Invalid key: not an admin key of this broker" if kind == "auth" else
                    "Send {\"type\": \"auth\", \"key\": \"<admin key>\"} first, or log in "
                    "to the admin as staff", CloseCode.UNAUTHORIZED)
            return
        if not await self._still_admitted():  # a logout or revocation since the last look
            await self._fail("Your credential no longer admits this dashboard",
                             CloseCode.UNAUTHORIZED)
            return
        try:
            message = await self._act(kind, frame)
        except ProtocolError as exc:
            await self.refuse(str(exc))
            return
        await self.send_text(orjson.dumps({"type": "done", "action": kind,
                                           "message": message}).decode())

    async def _act(self, kind: Any, frame: dict[str, Any]) -> str:
        """One operator action; what to tell the operator about it."""
        if kind in ("drain", "undrain"):
            worker_id = _text(frame, "worker_id")
            if not await services.drain(worker_id, kind == "drain"):
                return f"No worker {protocol.quote(worker_id)} is online"
            log.info("dashboard (%s, %s): %s %s", self.how, self.peer, kind,
                     protocol.quote(worker_id))
            return f"{'Draining' if kind == 'drain' else 'Back in rotation'}: {worker_id}"
        if kind == "cancel":
            request_id = _text(frame, "request_id")
            found = await services.cancel(request_id, f"{self.operator} on the dashboard")
            log.info("dashboard (%s, %s): cancel %s: %d found", self.how, self.peer,
                     protocol.quote(request_id), found)
            return (f"Cancelled {request_id}" if found
                    else f"No request {protocol.quote(request_id)} is running")
        raise ProtocolError(f"Unknown action {protocol.quote(kind)}: expected drain, "
                            "undrain or cancel")


_ERRORS = {CloseCode.UNAUTHORIZED: ErrorCode.UNAUTHORIZED,
           CloseCode.TOO_MANY_CONNECTIONS: ErrorCode.LIMIT_EXCEEDED}


def _text(frame: dict[str, Any], name: str) -> str:
    value = frame.get(name)
    if not isinstance(value, str) or not value or len(value) > protocol.MAX_ID_CHARS:
        raise ProtocolError(f"Field '{name}' must be a string of 1 to "
                            f"{protocol.MAX_ID_CHARS} characters")
    return value
