"""How many bytes the ASGI server holds for a peer that has not read them yet.

ASGI gives an application no back-pressure signal: under daphne, ``send`` hands
the frame to Twisted, which buffers whatever the peer does not read, without
bound; under uvicorn, ``send`` waits while the transport is over its high-water
mark, which would stall whoever called it (the dispatcher, answering for
everyone). So each socket keeps its own small outbox and asks its server's
transport how much is still unsent: a peer that lets that pass a bound is cut
off, and a send that would wait is queued instead of awaited.

This reaches one step below ASGI, to the transport object behind ``send``: for
daphne, the ``functools.partial(server.handle_reply, protocol)`` it passes as
``send``, whose protocol has a Twisted transport; for asyncio servers (uvicorn),
a bound method of a protocol with an asyncio transport. For any other server
nothing is known, and every send goes through the outbox (never blocking the
caller, bounded by what the outbox holds).
"""

from __future__ import annotations

import functools
from typing import Any, Callable


class Probe:
    """The server-side send buffer of one connection, where we can see it."""

    known = False

    def unsent(self) -> int:
        """Bytes written to the transport that the peer has not taken yet."""
        return 0

    def would_wait(self) -> bool:
        """Whether a send now would wait for the peer (it must be queued instead)."""
        return True

    def abort(self) -> None:
        """Drop the connection and everything buffered for it."""


class TwistedProbe(Probe):
    """A Twisted transport (daphne): writes never wait; the buffer grows instead."""

    known = True

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def unsent(self) -> int:
        t = self.transport
        # twisted.internet.abstract.FileDescriptor: what doWrite has yet to write.
        return len(t.dataBuffer) - t.offset + t._tempDataLen

    def would_wait(self) -> bool:
        return False

    def abort(self) -> None:
        self.transport.abortConnection()


class AsyncioProbe(Probe):
    """An asyncio transport (uvicorn): a send waits while it is over its high-water mark."""

    known = True

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.high = transport.get_write_buffer_limits()[1]

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def would_wait(self) -> bool:
        return self.transport.get_write_buffer_size() > self.high

    def abort(self) -> None:
        self.transport.abort()


def probe_for(send: Callable[..., Any]) -> Probe:
    """The probe of the connection behind an ASGI ``send`` callable."""
    try:
        if isinstance(send, functools.partial) and send.args:  # daphne
            transport = getattr(send.args[0], "transport", None)
            if transport is not None and hasattr(transport, "_tempDataLen"):
                return TwistedProbe(transport)
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "get_write_buffer_size"):
            return AsyncioProbe(transport)
    except Exception:  # noqa: BLE001 - an unknown server: the safe path
        pass
    return Probe()
