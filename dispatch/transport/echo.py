"""A websocket that sends every frame back unchanged: for protocol-conformance tests.

It is served at ``/ws/echo/`` only when the broker setting ``ECHO_ROUTE`` is true
(``BROKER_ECHO_ROUTE=1``), so the Autobahn test suite can drive daphne and Channels
frame by frame (tests/test_autobahn.py). It has nothing to do with brokering: no
credentials, no channel layer, no database, no limits beyond daphne's frame size.
Never turn it on in production.
"""

from __future__ import annotations

from .sockets import BaseSocket


class EchoConsumer(BaseSocket):
    """Text comes back as text, bytes as bytes, byte for byte."""

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None
                      ) -> None:
        if text_data is not None:
            await self.send(text_data=text_data)
        else:
            await self.send(bytes_data=bytes_data or b"")
