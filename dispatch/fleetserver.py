"""daphne's server, with its periodic bookkeeping proportional to what changed,
its websocket writes sent at once, and a doorman (:mod:`.doorman`) on every port.

daphne looks at every connection once a second (``application_checker``: has its
application finished, has it disconnected?) and every two seconds again
(``timeout_checker``: handshake and HTTP timeouts, and a websocket ping every 20 s).
With tens of thousands of idle workers those walks cost more than the workers do:
at 10,000 connections the first alone took 9% of a core.

Here the first looks only at connections that disconnected or whose application
finished since it last looked (a done-callback and the disconnect notice say so),
and the second skips open worker websockets: a worker heartbeats, and the broker
drops the silent ones itself (:mod:`dispatch.core.links`), so daphne's pings to it
would only be frames. Requesters and HTTP connections keep daphne's checks. And a
websocket frame is sent when written, not a turn of the loop later (:func:`send_at_once`).

Importing this module imports daphne's server, which installs Twisted's asyncio
reactor: import it where the server is started, not at the top of other modules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import reactor, tcp

from .doorman import Doorman
from .logsafe import LogBudget, quote

log = logging.getLogger("dispatch.server")
#: Tracebacks of errors inside the application: a few, then a count. (Each is a bug to
#: fix; one a peer can trigger at will must not fill the disk.)
APP_ERRORS = LogBudget(burst=5, refill_seconds=10.0)


class FleetServer(Server):
    """:class:`daphne.server.Server` for a broker: ``worker_port``'s open websockets
    are left to the broker's own liveness checks."""

    def __init__(self, *args: Any, worker_port: int, room: int, **kwargs: Any) -> None:
        #: Who gets a socket (set before daphne's run() builds its factory).
        self.doorman = Doorman(room)
        super().__init__(*args, **kwargs)
        self.worker_port = worker_port
        #: Connections the next application check looks at.
        self.settling: set[Any] = set()
        #: One entry per endpoint, in the order given: the port it listens on, or why
        #: it could not listen (a string). Filled before ``ready_callable`` is called.
        self.bound: list[int | str] = []

    @property
    def http_factory(self) -> Any:
        return self._http_factory

    @http_factory.setter
    def http_factory(self, factory: Any) -> None:
        """daphne's factory for every port, with :class:`Doorman` at its door."""
        factory.buildProtocol = self.doorman.wrap(factory.buildProtocol)
        self._http_factory = factory

    def listen_success(self, port: Any) -> None:
        super().listen_success(port)
        self.bound.append(port.getHost().port)

    def listen_error(self, failure: Any) -> None:
        """Record why, and do not start: ``serve`` reports it and exits non-zero
        (daphne logs it as CRITICAL and returns as if it had served)."""
        self.bound.append(failure.getErrorMessage())
        self.stop()

    def protocol_connected(self, protocol: Any) -> None:
        super().protocol_connected(protocol)
        if isinstance(protocol, WebSocketProtocol) and isinstance(protocol.transport,
                                                                   tcp.Connection):
            send_at_once(protocol.transport)

    def protocol_disconnected(self, protocol: Any) -> None:
        super().protocol_disconnected(protocol)
        self.settling.add(protocol)

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> Any:
        queue = super().create_application(protocol, scope)
        instance = self.connections.get(protocol, {}).get("application_instance")
        if instance is not None:
            instance.add_done_callback(lambda _done: self.settling.add(protocol))
        return queue

    def application_checker(self) -> None:
        """daphne's check, for the connections that changed: reap finished applications
        (logging their exceptions), cancel those that outlive their connection by more
        than ``application_close_timeout``, forget connections that are done."""
        settling, self.settling = self.settling, set()
        now = time.time()
        for protocol in settling:
            details = self.connections.get(protocol)
            if details is None:
                continue
            gone = details.get("disconnected")
            instance = details.get("application_instance")
            if instance is not None and instance.done():
                del details["application_instance"]
                self._report(protocol, instance, gone)
                instance = None
            if instance is None:
                if gone:
                    del self.connections[protocol]
                continue
            if gone:  # its application is still running: look again next time
                self.settling.add(protocol)
                if now - gone > self.application_close_timeout:
                    log.warning("application for connection %r took too long to shut down "
                                "and was cancelled", protocol)
                    instance.cancel()
        reactor.callLater(1, self.application_checker)

    def _report(self, protocol: Any, instance: asyncio.Future[Any], gone: float | None
                ) -> None:
        if instance.cancelled():
            return
        exception = instance.exception()
        if exception is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            self.stop()
            return
        left_out = APP_ERRORS.allow()
        if left_out is not None:
            log.error("Exception inside application: %s%s", quote(str(exception), 300),
                      f" ({left_out} more left out)" if left_out else "", exc_info=exception)
        if not gone:
            protocol.handle_exception(exception)

    def timeout_checker(self) -> None:
        """daphne's timeouts and pings, except for open worker websockets."""
        for protocol in list(self.connections):
            if not self._is_open_worker(protocol):
                protocol.check_timeouts()
        reactor.callLater(2, self.timeout_checker)

    def _is_open_worker(self, protocol: Any) -> bool:
        if not isinstance(protocol, WebSocketProtocol):
            return False
        address = getattr(protocol, "server_addr", None)
        return (protocol.state == WebSocketProtocol.STATE_OPEN and address is not None
                and address[1] == self.worker_port)


def send_at_once(transport: tcp.Connection) -> None:
    """Make ``transport.write`` send at once when nothing waits before it.

    Twisted's TCP ``write`` only buffers and registers for writability; the send
    happens in a later turn of the loop, after two ``epoll_ctl`` calls (add, then
    remove the writer): for a one-frame answer that is a loop turn of latency and
    three system calls where one does. When its buffers are empty, this sends right
    away (as asyncio's transports do) and leaves only what the kernel would not take
    to Twisted's buffered path, which keeps the order, flow control and errors.
    """
    buffered = transport.write

    def write(data: bytes) -> None:
        if (transport.connected and not transport.disconnecting
                and not transport._tempDataLen
                and len(transport.dataBuffer) == transport.offset):
            sent = transport.writeSomeData(data)
            if not isinstance(sent, int):  # lost: Twisted's path reports it
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    transport.write = write  # type: ignore[method-assign]
