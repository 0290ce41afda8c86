"""Who gets a socket: a cap per source address, files kept for the database and Redis,
and a deadline for a connection that has yet to say what it wants.

Each connection is a file. Without these, an outsider that opens connections and
sends one byte of a request head every 20 s held them for ever (the HTTP idle timer
restarts on every byte): at 19,800 the broker was at its open-files limit, and
``/healthz``, registrations, requesters and the credential reload (which opens the
database) all failed. Here, on every port:

- a connection is refused at once (closed on accept) when its source address holds
  ``MAX_CONNECTIONS_PER_ADDRESS`` already (an IPv6 peer counts by its /64; a trusted
  proxy is not capped, the peers behind it are its business);
- ``RESERVED_FILES`` of the open-files limit are never given to connections, so the
  database, Redis and the logs can always open theirs;
- a connection that is not a websocket and has no request in process (a request
  head or body still arriving, or an idle keep-alive) is closed ``HEAD_TIMEOUT``
  after it came, or after its last request, however it trickles; and when the room
  for connections is full, a newcomer closes the oldest such one instead of being
  refused: a real peer's head takes milliseconds, a trickle's never ends.

Workers and requesters that have upgraded to a websocket are past the door: their
own checks (registration timeout, heartbeats, credentials) apply.

Built on the accept path (the factory's ``buildProtocol`` and the transport's
``connectionLost``): nothing here runs per frame.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from typing import Any, Callable

from twisted.internet import reactor

from . import conf
from .auth import is_trusted_proxy
from .logsafe import LogBudget

log = logging.getLogger("dispatch.server")
REFUSALS = LogBudget(burst=5, refill_seconds=10.0)


def address_key(host: str) -> str:
    """What a source address counts as: itself, or for IPv6 its /64 (one host's share)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


def in_process(channel: Any) -> bool:
    """An HTTP connection with a request its application is handling (a slow answer,
    not a slow peer)."""
    channel = getattr(channel, "_channel", channel)  # Twisted's HTTP/1.1-or-2 proxy
    return any(getattr(r, "request_start", None) for r in getattr(channel, "requests", ()))


class Doorman:
    """The open connections of one server, by source address, and those at the door."""

    def __init__(self, room: int) -> None:
        self.room = room  # connections at most: the open-files limit less RESERVED_FILES
        self.by_address: Counter[str] = Counter()
        self.open: dict[Any, str] = {}  # transport -> its address key
        #: Connections that are not (yet) websockets: transport -> (protocol, since when
        #: it waits), oldest first.
        self.door: dict[Any, tuple[Any, float]] = {}
        self._sweeping = False

    def wrap(self, build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A factory's ``buildProtocol`` with the door in front of it."""
        def build_protocol(addr: Any) -> Any:
            host = getattr(addr, "host", "")
            key = address_key(host)
            if not self.admits(host, key):
                return None  # Twisted closes the socket at once
            protocol = build(addr)
            if protocol is not None:
                made = protocol.makeConnection
                protocol.makeConnection = lambda transport: self._came(
                    transport, protocol, key, made)
            return protocol
        return build_protocol

    def admits(self, host: str, key: str) -> bool:
        """Whether a connection from ``host`` (which counts as ``key``) gets a socket."""
        most = conf.get("MAX_CONNECTIONS_PER_ADDRESS")
        if most and self.by_address[key] >= most and not is_trusted_proxy(host):
            REFUSALS.log(log, logging.WARNING, "refused a connection from %s: it has %d open "
                         "(MAX_CONNECTIONS_PER_ADDRESS)", key, self.by_address[key])
            return False
        if len(self.open) >= self.room and not self._make_room():
            REFUSALS.log(log, logging.WARNING, "refused a connection from %s: %d open, the "
                         "open-files limit less those kept for the database and Redis",
                         key, len(self.open))
            return False
        return True

    def _came(self, transport: Any, protocol: Any, key: str,
              made: Callable[[Any], None]) -> None:
        self.open[transport] = key
        self.by_address[key] += 1
        self.door[transport] = (protocol, time.monotonic())
        lost = transport.connectionLost
        transport.connectionLost = lambda reason: (self._left(transport), lost(reason))
        made(transport)
        if not self._sweeping:
            self._sweeping = True
            reactor.callLater(1.0, self._sweep)

    def _left(self, transport: Any) -> None:
        self.door.pop(transport, None)
        key = self.open.pop(transport, None)
        if key is not None:
            self.by_address[key] -= 1
            if not self.by_address[key]:
                del self.by_address[key]

    def _waiting(self, transport: Any, protocol: Any) -> bool:
        """Still at the door: not upgraded to a websocket, no request in process."""
        return transport.protocol is protocol and not in_process(protocol)

    def _shut(self, transport: Any) -> None:
        """Close a connection that waited at the door (it is forgotten at once, so the
        room it held is free now)."""
        self._left(transport)
        transport.abortConnection()

    def _make_room(self) -> bool:
        """Close the connection that has waited at the door longest, if any does."""
        for transport, (protocol, _) in self.door.items():
            if self._waiting(transport, protocol):
                self._shut(transport)
                return True
        return False

    def _sweep(self) -> None:
        """Once a second while any connection is at the door: close those that waited
        HEAD_TIMEOUT; forget those that became websockets."""
        now, limit = time.monotonic(), conf.get("HEAD_TIMEOUT")
        for transport, (protocol, since) in list(self.door.items()):
            if transport.protocol is not protocol:  # a websocket now: past the door
                del self.door[transport]
            elif in_process(protocol):
                self.door[transport] = (protocol, now)  # its wait starts after the answer
            elif now - since > limit:
                self._shut(transport)
        self._sweeping = bool(self.door)
        if self._sweeping:
            reactor.callLater(1.0, self._sweep)
