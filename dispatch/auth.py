"""Who may connect: worker tokens, requester API keys, admin keys, and protected mode.

A peer shows its token at the handshake, as ``Authorization: Bearer <token>`` or,
for clients that cannot set headers (browsers), as ``?token=<token>`` in the URL.
Tokens are checked against digests held in memory; the :class:`Guard` reloads them
from the database every few seconds, off the request path, and closes the live
connections of a credential that was revoked meanwhile.

While no credential exists at all, the broker is in *protected mode* (as Redis
is): loopback peers need nothing and remote peers are refused with a reason that
says how to create a token. Once one exists, every peer needs a valid one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Protocol
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.db import DatabaseError

from . import conf
from .loops import PerLoop

log = logging.getLogger("dispatch.auth")

PREFIXES = {"worker": "wrk", "requester": "req", "admin": "adm"}

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_MANY = 4429


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(kind: str) -> tuple[str, str]:
    """A fresh token of ``kind`` and its key id (the part that may be shown later)."""
    key_id = secrets.token_hex(6)
    return f"{PREFIXES[kind]}_{key_id}_{secrets.token_urlsafe(32)}", key_id


def create_credential(name: str, kind: str, commands: Iterable[str] = (),
                      max_connections: int = 0) -> tuple[Any, str]:
    """Store a new credential; returns it and the token, which is not kept anywhere."""
    from .models import Credential

    token, key_id = new_token(kind)
    credential = Credential.objects.create(
        name=name, kind=kind, key_id=key_id, digest=digest(token),
        commands=sorted(set(commands)), max_connections=max_connections)
    return credential, token


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid credential allows."""

    credential_id: int
    name: str
    kind: str
    commands: frozenset[str] | None  # None: every command
    max_connections: int

    def allows(self, command: str) -> bool:
        return self.commands is None or command in self.commands


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str


class Revocable(Protocol):
    async def revoke(self, reason: str) -> None: ...


def presented_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


def is_loopback(scope: dict[str, Any]) -> bool:
    return is_loopback_host((scope.get("client") or ("", 0))[0])


def is_loopback_host(host: str | None) -> bool:
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Browsers send Origin; only listed origins may use the requester socket.

    This stops another site's page from using a visitor's network position or
    cookies to talk to the broker (cross-site WebSocket hijacking). Programs that
    send no Origin are not browsers and are judged by their token alone.
    """
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            allowed = {o.strip() for o in conf.get("ALLOWED_ORIGINS").split(",") if o.strip()}
            return "*" in allowed or value.decode("latin-1") in allowed
    return True


class Guard:
    """The credentials of one broker process, and the connections made with each."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Grant]] = {}  # key_id -> (digest, grant)
        self._connections: dict[int, set[Revocable]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name="auth-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def protected_mode(self) -> bool:
        return not self._keys

    def admit(self, scope: dict[str, Any], kind: str) -> Grant | Refusal | None:
        """A grant, a refusal, or None for a loopback peer in protected mode."""
        token = presented_token(scope)
        if self.protected_mode:
            if is_loopback(scope):
                return None
            return Refusal(CLOSE_FORBIDDEN, (
                "This broker has no credentials yet and accepts local connections only. "
                f"Create a token on the broker: python manage.py token create {kind} NAME"))
        if token is None:
            return Refusal(CLOSE_UNAUTHORIZED, "Missing credentials: send 'Authorization: "
                                               "Bearer <token>' or add ?token=<token>")
        grant = self._lookup(token)
        if grant is None:
            return Refusal(CLOSE_UNAUTHORIZED, "Invalid or revoked token")
        if grant.kind != kind:
            return Refusal(CLOSE_FORBIDDEN,
                           f"A {grant.kind} credential cannot be used on the {kind} socket")
        if grant.max_connections and \
                len(self._connections[grant.credential_id]) >= grant.max_connections:
            return Refusal(CLOSE_TOO_MANY, f"Too many connections for '{grant.name}' "
                                           f"(limit {grant.max_connections} per process)")
        return grant

    def check_api_token(self, token: str) -> bool:
        """Whether ``token`` is an active admin key (for the control API)."""
        grant = self._lookup(token)
        return grant is not None and grant.kind == "admin"

    def _lookup(self, token: str) -> Grant | None:
        """The grant of a valid token: found by its key id, compared in constant time."""
        parts = token.split("_", 2)  # prefix, key id, secret (which may contain "_")
        entry = self._keys.get(parts[1]) if len(parts) == 3 else None
        if entry is None or not hmac.compare_digest(entry[0], digest(token)):
            return None
        return entry[1]

    def attach(self, grant: Grant | None, conn: Revocable) -> None:
        if grant is not None:
            self._connections[grant.credential_id].add(conn)

    def detach(self, grant: Grant | None, conn: Revocable) -> None:
        if grant is not None:
            held = self._connections.get(grant.credential_id)
            if held is not None:
                held.discard(conn)
                if not held:
                    del self._connections[grant.credential_id]

    async def refresh(self) -> None:
        """Reload credentials; close connections whose credential is gone or revoked."""
        try:
            rows = await database_sync_to_async(_active_credentials)()
        except DatabaseError as exc:
            log.warning("could not reload credentials (keeping the last ones): %s", exc)
            return
        self._keys = {
            row["key_id"]: (row["digest"], Grant(
                row["id"], row["name"], row["kind"],
                frozenset(row["commands"]) if row["commands"] else None,
                row["max_connections"]))
            for row in rows}
        live = {grant.credential_id for _, grant in self._keys.values()}
        for credential_id in [c for c in self._connections if c not in live]:
            for conn in list(self._connections.pop(credential_id)):
                await conn.revoke("Credential revoked")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.get("AUTH_REFRESH_SECONDS"))
            await self.refresh()


def _active_credentials() -> list[dict[str, Any]]:
    from .models import Credential

    return list(Credential.objects.filter(active=True).values(
        "id", "name", "kind", "key_id", "digest", "commands", "max_connections"))


_guards: PerLoop[Guard] = PerLoop(Guard)
#: The guard of this process (of this event loop), started on first use.
get_guard = _guards.get
stop_guard = _guards.stop
