"""Who may connect: worker tokens, requester API keys, admin keys, and protected mode.

A peer shows its token at the handshake, as ``Authorization: Bearer <token>`` or,
for clients that cannot set headers (browsers), as ``?token=<token>`` in the URL.
Tokens are checked against digests held in memory; the :class:`Guard` reloads them
from the database every few seconds, off the request path, and closes the live
connections of a credential that was revoked meanwhile.

*Protected mode* is for one developer on one machine: while no credential has
ever been created (and no ``API_TOKEN`` is set), loopback peers need nothing and
every other peer is refused with a reason that says how to create a token. The
first credential ends it for good: connections admitted without one are closed,
and revoking every credential does not reopen the broker (only deleting them all
with ``manage.py token delete`` does).

A peer's address is the socket's, unless that socket is one of
``TRUSTED_PROXIES``: then ``X-Forwarded-For`` names it. A loopback peer that
carries forwarding headers from a proxy we do not trust is not taken for local.
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
from functools import lru_cache
from typing import Any, Iterable, Protocol
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.db import DatabaseError

from workers.protocol import CloseCode, ErrorCode, pool_label

from . import conf
from .loops import PerLoop

log = logging.getLogger("dispatch.auth")

PREFIXES = {"worker": "wrk", "requester": "req", "admin": "adm"}
#: Headers a proxy adds; from a peer that is not a trusted proxy they mean "not local".
FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")
#: The credential id of connections admitted in protected mode.
ANONYMOUS_ID = 0

Headers = Iterable[tuple[bytes, bytes]]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(kind: str) -> tuple[str, str]:
    """A fresh token of ``kind`` and its key id (the part that may be shown later)."""
    key_id = secrets.token_hex(6)
    return f"{PREFIXES[kind]}_{key_id}_{secrets.token_urlsafe(32)}", key_id


def create_credential(name: str, kind: str, commands: Iterable[str] = (),
                      max_connections: int = 0, max_priority: int = 9, *,
                      pools: Iterable[str] = (), labels: dict[str, str] | None = None,
                      version: str = "", max_weight: float | None = None) -> tuple[Any, str]:
    """Store a new credential; returns it and the token, which is not kept anywhere.
    Raises django's ValidationError for rights that do not fit its kind."""
    from .models import Credential

    token, key_id = new_token(kind)
    credential = Credential(
        name=name, kind=kind, key_id=key_id, digest=digest(token),
        commands=sorted(set(commands)), max_connections=max_connections,
        max_priority=max_priority, pools=sorted(set(pools)), labels=labels or {},
        version=version, max_weight=max_weight)
    credential.clean()
    credential.save()
    return credential, token


@dataclass(frozen=True, slots=True)
class Grant:
    """What an admitted connection may do: a credential's rights, or protected mode's."""

    credential_id: int  # ANONYMOUS_ID in protected mode
    name: str
    kind: str
    commands: frozenset[str] | None  # None: every command
    max_connections: int
    #: The highest priority its requests get: a tenant cannot jump every queue at 9.
    max_priority: int = 9
    #: Tenancy: the pools a worker token's workers serve, or the pool a requester key is
    #: served by (none: it reaches every worker).
    pools: tuple[str, ...] = ()
    #: Worker tokens: labels, version and highest weight its workers get, whatever they say.
    labels: tuple[tuple[str, str], ...] = ()
    version: str = ""
    max_weight: float | None = None

    @classmethod
    def anonymous(cls, kind: str) -> Grant:
        return cls(ANONYMOUS_ID, "anonymous (protected mode)", kind, None, 0)

    @property
    def pool_labels(self) -> dict[str, str]:
        """The labels of its pools: a worker's own, or what a requester's requests select."""
        return dict(pool_label(p) for p in self.pools)

    @property
    def owner(self) -> str:
        """Who a worker id registered with this grant belongs to."""
        return f"credential:{self.credential_id}" if self.credential_id else "anonymous"

    def allows(self, command: str) -> bool:
        return self.commands is None or command in self.commands

    def refused_commands(self, commands: Iterable[str]) -> list[str]:
        """Those of ``commands`` this grant does not allow, sorted."""
        return sorted(c for c in set(commands) if not self.allows(c))


@dataclass(frozen=True, slots=True)
class Refusal:
    code: CloseCode
    reason: str

    @property
    def error(self) -> ErrorCode:
        """The error code the refusal frame carries."""
        if self.code is CloseCode.UNAUTHORIZED:
            return ErrorCode.UNAUTHORIZED
        if self.code is CloseCode.TOO_MANY_CONNECTIONS:
            return ErrorCode.LIMIT_EXCEEDED
        return ErrorCode.NOT_ALLOWED


class Revocable(Protocol):
    kind: str  # "worker", "requester", "dashboard"

    async def revoke(self, reason: str) -> None: ...

    async def close(self, code: int | bool | None = None, reason: str | None = None
                    ) -> None: ...


# --------------------------------------------------------------------------- peers


def header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def presented_token(scope: dict[str, Any]) -> str | None:
    value = header(scope.get("headers", ()), b"authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


@lru_cache(maxsize=8)
def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in ``host``; an IPv4 address mapped into IPv6 (a dual-stack
    listener's ``::ffff:127.0.0.1``) as the IPv4 address it is."""
    try:
        address = ipaddress.ip_address((host or "").strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_trusted_proxy(host: str | None) -> bool:
    address = _ip(host)
    return address is not None and any(address in n for n in
                                       _networks(conf.get("TRUSTED_PROXIES")))


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a connection comes from, as far as the broker can tell."""

    host: str
    port: int
    #: It came through a proxy we do not trust (forwarding headers from an untrusted hop).
    proxied: bool = False

    @property
    def local(self) -> bool:
        """Loopback, and not a proxy's forward: what protected mode admits."""
        address = _ip(self.host)
        return address is not None and address.is_loopback and not self.proxied

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def peer_of(client: Any, headers: Headers) -> Peer:
    """The peer of a socket at ``client`` (host, port) whose request carried ``headers``.

    ``X-Forwarded-For`` is read from the right, one hop per trusted proxy: the first
    address that is not a trusted proxy is the client. Without trusted proxies it
    is ignored, and its presence on a loopback socket marks the peer as proxied.
    """
    headers = list(headers)
    host, port = (client or ("?", 0))[0], (client or ("?", 0))[1]
    forwarded = header(headers, b"x-forwarded-for")
    if forwarded and is_trusted_proxy(host):
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        while hops and is_trusted_proxy(host):
            host, port = hops.pop(), 0
        return Peer(host, port, proxied=False)
    proxied = any(header(headers, name) for name in FORWARDING_HEADERS)
    return Peer(str(host), int(port or 0), proxied=proxied)


def origin_listed(origin: str | None) -> bool:
    """No Origin (not a browser), or one listed in ``ALLOWED_ORIGINS``.

    Browsers send Origin on every WebSocket handshake; refusing unlisted ones stops
    another site's page from using a visitor's network position (or a DNS
    rebinding of its own name to 127.0.0.1) to talk to the broker.
    """
    if origin is None:
        return True
    allowed = {o.strip() for o in conf.get("ALLOWED_ORIGINS").split(",") if o.strip()}
    return "*" in allowed or origin in allowed


# --------------------------------------------------------------------------- guard


class Guard:
    """The credentials of one broker process, and the connections made with each."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[str, Grant]] = {}  # key_id -> (digest, grant)
        self._any_credential = False  # ever created (revoked ones count)
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
        return not self._any_credential and not conf.get("API_TOKEN")

    def admit(self, scope: dict[str, Any], kind: str) -> Grant | Refusal:
        """The grant of a new connection to the ``kind`` socket, or why it is refused."""
        headers = scope.get("headers", ())
        if not origin_listed(header(headers, b"origin")):
            return Refusal(CloseCode.FORBIDDEN,
                           "Origin not allowed: add it to BROKER_ALLOWED_ORIGINS")
        if self.protected_mode:
            peer = peer_of(scope.get("client"), headers)
            if peer.local:
                return Grant.anonymous(kind)
            return Refusal(CloseCode.FORBIDDEN, (
                "This broker has no credentials yet and accepts direct local connections "
                "only" + (" (this one came through a proxy)" if peer.proxied else "") +
                f". Create a token on the broker: python manage.py token create {kind} NAME"))
        token = presented_token(scope)
        if token is None:
            return Refusal(CloseCode.UNAUTHORIZED, "Missing credentials: send 'Authorization: "
                                                   "Bearer <token>', or the token as the URL's "
                                                   "'token' query parameter")
        grant = self._lookup(token)
        if grant is None:
            return Refusal(CloseCode.UNAUTHORIZED, "Invalid or revoked token")
        if grant.kind != kind:
            return Refusal(CloseCode.FORBIDDEN,
                           f"A {grant.kind} credential cannot be used on the {kind} socket")
        if grant.max_connections and \
                len(self._connections[grant.credential_id]) >= grant.max_connections:
            return Refusal(CloseCode.TOO_MANY_CONNECTIONS,
                           f"Too many connections for '{grant.name}' "
                           f"(limit {grant.max_connections} per process)")
        return grant

    def check_api_token(self, token: str) -> bool:
        """Whether ``token`` is ``API_TOKEN`` or an active admin key (for the control API)."""
        return self.operator(token) is not None

    def operator(self, token: str) -> str | None:
        """Who ``token`` admits to the control API, for the record (a cancel says who
        asked): the admin key's name, or ``API_TOKEN``; None if it admits nobody."""
        static = conf.get("API_TOKEN")
        if static and hmac.compare_digest(token.encode(), static.encode()):
            return "API_TOKEN"
        grant = self._lookup(token)
        return f"admin key '{grant.name}'" if grant is not None and grant.kind == "admin" \
            else None

    def requester_grant(self, token: str | None, peer: Peer) -> Grant | None:
        """The grant of a requester key presented over HTTP (or, in protected mode, a
        direct local peer's): who may see a request's answer there."""
        if token is None:
            return Grant.anonymous("requester") if self.protected_mode and peer.local else None
        grant = self._lookup(token)
        return grant if grant is not None and grant.kind == "requester" else None

    def _lookup(self, token: str) -> Grant | None:
        """The grant of a valid token: found by its key id, compared in constant time."""
        parts = token.split("_", 2)  # prefix, key id, secret (which may contain "_")
        entry = self._keys.get(parts[1]) if len(parts) == 3 else None
        if entry is None or not hmac.compare_digest(entry[0], digest(token)):
            return None
        return entry[1]

    async def close_all(self, kind: str, code: int, reason: str) -> int:
        """Close every admitted connection of ``kind`` (a stopping broker sends its
        requesters away: they come back to attach to their requests)."""
        closing = [c for held in self._connections.values() for c in held if c.kind == kind]
        for conn in closing:
            await conn.close(code, reason)
        return len(closing)

    def attach(self, grant: Grant, conn: Revocable) -> None:
        self._connections[grant.credential_id].add(conn)

    def detach(self, grant: Grant, conn: Revocable) -> None:
        held = self._connections.get(grant.credential_id)
        if held is not None:
            held.discard(conn)
            if not held:
                del self._connections[grant.credential_id]

    async def refresh(self) -> None:
        """Reload credentials; close connections whose credential no longer admits them."""
        try:
            rows = await database_sync_to_async(_credentials)()
        except DatabaseError as exc:
            log.warning("could not reload credentials (keeping the last ones): %s", exc)
            return
        self._any_credential = bool(rows)
        before = {grant.credential_id: grant for _, grant in self._keys.values()}
        self._keys = {row["key_id"]: (row["digest"], _grant(row)) for row in rows
                      if row["active"]}
        live = {grant.credential_id: grant for _, grant in self._keys.values()}
        if self.protected_mode:
            live[ANONYMOUS_ID] = Grant.anonymous("")
        for credential_id in [c for c in self._connections if c not in live]:
            reason = ("Credentials are required now: reconnect with a token"
                      if credential_id == ANONYMOUS_ID else "Credential revoked")
            for conn in list(self._connections.pop(credential_id)):
                await conn.revoke(reason)
        # Rights changed (a pool, pinned labels): its connections come back to take the
        # new ones; a worker must not go on serving a pool its token has left.
        for credential_id in [c for c, grant in live.items() if c in self._connections
                              and before.get(c, grant) != grant]:
            for conn in list(self._connections.pop(credential_id)):
                await conn.close(CloseCode.TRY_AGAIN_LATER,
                                 "Credential changed: reconnect to take its new rights")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.get("AUTH_REFRESH_SECONDS"))
            await self.refresh()


def _grant(row: dict[str, Any]) -> Grant:
    return Grant(row["id"], row["name"], row["kind"],
                 frozenset(row["commands"]) if row["commands"] else None,
                 row["max_connections"], row["max_priority"], tuple(sorted(row["pools"])),
                 tuple(sorted(row["labels"].items())), row["version"], row["max_weight"])


def _credentials() -> list[dict[str, Any]]:
    from .models import Credential

    return list(Credential.objects.values(
        "id", "name", "kind", "key_id", "digest", "commands", "max_connections",
        "max_priority", "pools", "labels", "version", "max_weight", "active"))


_guards: PerLoop[Guard] = PerLoop(Guard)
#: The guard of this process (of this event loop), started on first use.
get_guard = _guards.get
stop_guard = _guards.stop
