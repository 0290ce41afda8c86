"""daphne's bookkeeping, proportional to change (dispatch/fleetserver.py), without sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dispatch import fleetserver
from dispatch.fleetserver import FleetServer, WebSocketProtocol

WORKER_PORT = 9001


class Protocol:
    """Stands in for daphne's HTTP protocol: what the checks call on it."""

    def __init__(self) -> None:
        self.exceptions: list[BaseException] = []
        self.checked = 0

    def handle_exception(self, exc: BaseException) -> None:
        self.exceptions.append(exc)

    def check_timeouts(self) -> None:
        self.checked += 1


def websocket(port: int, state: int = WebSocketProtocol.STATE_OPEN) -> Any:
    ws = WebSocketProtocol.__new__(WebSocketProtocol)
    ws.state, ws.server_addr, ws.checked = state, ["127.0.0.1", port], 0

    def check() -> None:
        ws.checked += 1

    ws.check_timeouts = check
    return ws


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FleetServer:
    monkeypatch.setattr(fleetserver.reactor, "callLater", lambda *args: None)
    gate = asyncio.Event()

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("fail"):
            raise RuntimeError("boom")
        await gate.wait()

    srv = FleetServer(application=application, endpoints=["tcp:port=0"],
                      worker_port=WORKER_PORT, room=1000, application_close_timeout=10)
    srv.connections = {}
    srv.gate = gate  # type: ignore[attr-defined]
    return srv


def connect(server: FleetServer, scope: dict[str, Any] | None = None) -> Protocol:
    protocol = Protocol()
    server.protocol_connected(protocol)
    server.create_application(protocol, scope or {"type": "websocket"})
    return protocol


async def test_running_connections_are_not_looked_at(server: FleetServer) -> None:
    for _ in range(100):
        connect(server)
    await asyncio.sleep(0)
    server.application_checker()
    assert len(server.connections) == 100 and not server.settling


async def test_a_finished_and_disconnected_connection_is_forgotten(server: FleetServer
                                                                    ) -> None:
    stays, goes = connect(server), connect(server)
    server.protocol_disconnected(goes)
    server.gate.set()  # type: ignore[attr-defined]  # every application returns
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    server.application_checker()
    assert goes not in server.connections
    # Its application is done, the socket still open: reaped, kept until it disconnects.
    assert "application_instance" not in server.connections[stays]
    server.protocol_disconnected(stays)
    server.application_checker()
    assert server.connections == {}


async def test_an_application_outliving_its_connection_is_cancelled(
        server: FleetServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    lingering = connect(server)
    server.protocol_disconnected(lingering)
    server.application_checker()  # not yet past the close timeout: looked at again
    assert lingering in server.connections and lingering in server.settling
    later = fleetserver.time.time() + 11
    monkeypatch.setattr(fleetserver.time, "time", lambda: later)
    with caplog.at_level(logging.WARNING, "dispatch.server"):
        server.application_checker()
    await asyncio.sleep(0)
    assert "too long to shut down" in caplog.text
    server.application_checker()
    assert server.connections == {}


async def test_an_application_error_is_logged_and_passed_to_its_connection(
        server: FleetServer, caplog: pytest.LogCaptureFixture) -> None:
    failing = connect(server, {"type": "websocket", "fail": True})
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, "dispatch.server"):
        server.application_checker()
    assert "Exception inside application: boom" in caplog.text
    assert [str(e) for e in failing.exceptions] == ["boom"]


def test_open_worker_websockets_are_left_to_the_broker(server: FleetServer) -> None:
    worker, requester = websocket(WORKER_PORT), websocket(WORKER_PORT + 1)
    handshaking = websocket(WORKER_PORT, WebSocketProtocol.STATE_CONNECTING)
    http = Protocol()
    for protocol in (worker, requester, handshaking, http):
        server.connections[protocol] = {}
    server.timeout_checker()
    assert (worker.checked, requester.checked, handshaking.checked, http.checked) == \
        (0, 1, 1, 1)


class Transport:
    """What :func:`send_at_once` reads of Twisted's TCP connection."""

    def __init__(self, takes: int | None = None) -> None:
        self.connected, self.disconnecting = True, False
        self._tempDataLen, self.dataBuffer, self.offset = 0, b"", 0
        self.takes = takes  # bytes the kernel accepts per send; None: all
        self.sent: list[bytes] = []
        self.buffered: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int | Exception:
        if self.takes == -1:
            return ConnectionError("lost")
        n = len(data) if self.takes is None else min(self.takes, len(data))
        self.sent.append(bytes(data[:n]))
        return n

    def write(self, data: bytes) -> None:  # Twisted's buffered path
        self.buffered.append(bytes(data))
        self._tempDataLen += len(data)


def test_a_frame_is_sent_when_written_and_the_rest_keeps_its_order() -> None:
    fast = Transport()
    fleetserver.send_at_once(fast)  # type: ignore[arg-type]
    fast.write(b"one")
    fast.write(b"two")
    assert (fast.sent, fast.buffered) == ([b"one", b"two"], [])
    # The kernel takes part of a frame: the rest, and all after it, go Twisted's way.
    full = Transport(takes=2)
    fleetserver.send_at_once(full)  # type: ignore[arg-type]
    full.write(b"three")
    full.write(b"four")
    assert (full.sent, full.buffered) == ([b"th"], [b"ree", b"four"])
    lost = Transport(takes=-1)
    fleetserver.send_at_once(lost)  # type: ignore[arg-type]
    lost.write(b"five")
    assert (lost.sent, lost.buffered) == ([], [b"five"])  # Twisted reports the loss
