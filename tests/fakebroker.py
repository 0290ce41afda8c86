"""Small stand-ins for the broker's two sockets, for testing the clients.

``FakeBroker`` speaks the worker socket's envelope protocol just enough to
register a worker and answer its heartbeats; the test drives everything else
through :class:`FakeConnection`. ``fake_api`` serves the requester API with a
function the test supplies. Both listen on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from workers.protocol import Message

WAIT = 3.0  # seconds any single expectation may take before the test fails


class FakeConnection:
    """One worker connection as the broker sees it."""

    def __init__(self, ws: ServerConnection, hello: Message, silent: bool) -> None:
        self.ws = ws
        self.hello = hello
        self.silent = silent
        self.inbox: asyncio.Queue[Message | str] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def send(self, msg: Message | str) -> None:
        await self.ws.send(msg if isinstance(msg, str) else msg.to_json())

    async def recv(self, *types: str, timeout: float = WAIT) -> Message:
        """The next frame of one of ``types`` (any type if none given); others are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.inbox.get()
                if isinstance(item, str):
                    raise AssertionError(f"worker sent an unreadable frame: {item!r}")
                if not types or item.type in types:
                    return item

    async def wait_closed(self, timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()


class FakeBroker:
    """The broker's worker socket, reduced to registration and heartbeats.

    Settings are read when a worker connects, so a test may change them between
    connections: ``refuse`` answers ``connect`` with an error and closes;
    ``mute`` never answers ``connect`` at all; ``silent`` acks the registration
    and then never sends anything again.
    """

    def __init__(self, *, heartbeat_interval: float = 5.0, assign_id: str | None = None
                 ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.assign_id = assign_id
        self.refuse: str | None = None
        self.refuse_code = 1000  # the close code that follows a refusal
        self.mute = False
        self.silent = False
        self.port = 0
        self.connections: asyncio.Queue[FakeConnection] = asyncio.Queue()
        self.hellos: list[Message] = []
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> FakeBroker:
        self._server = await serve(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeBroker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def next_connection(self, timeout: float = WAIT) -> FakeConnection:
        """The next worker that registered."""
        async with asyncio.timeout(timeout):
            return await self.connections.get()

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            hello = Message.from_json(await ws.recv())
        except ConnectionClosed:
            return
        self.hellos.append(hello)
        if self.mute:
            await ws.wait_closed()
            return
        if self.refuse is not None:
            await ws.send(Message.error(self.refuse, reply_to=hello.msg_id).to_json())
            await ws.close(self.refuse_code)
            return
        conn = FakeConnection(ws, hello, self.silent)
        await ws.send(Message("connect", {
            "worker_id": self.assign_id or hello.data.get("worker_id"),
            "heartbeat_interval": self.heartbeat_interval}).to_json())
        await self.connections.put(conn)
        try:
            await self._read(conn)
        finally:
            conn.closed.set()

    async def _read(self, conn: FakeConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in conn.ws:
                try:
                    msg = Message.from_json(raw)
                except ValueError:
                    await conn.inbox.put(str(raw))
                    continue
                if (msg.type == "heartbeat" and "ack" not in msg.data and not conn.silent):
                    await conn.send(Message.heartbeat(ack=msg.msg_id))
                await conn.inbox.put(msg)


ApiHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


@contextlib.asynccontextmanager
async def fake_api(answer: ApiHandler, frames: list[str] | None = None) -> AsyncIterator[str]:
    """Serve the requester API: each request (alone in its frame, or one of a batch) is
    handed, parsed, to ``answer`` in its own task, and whatever dict it returns is sent
    back (None: no answer). Every frame received is added to ``frames``. Yields the URL."""

    async def handle(ws: ServerConnection) -> None:
        async def one(req: Any) -> None:
            reply = await answer(req)
            if reply is not None:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps(reply))

        tasks: set[asyncio.Task[None]] = set()
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                if frames is not None:
                    frames.append(str(raw))
                parsed = json.loads(raw)
                for req in parsed if isinstance(parsed, list) else [parsed]:
                    task = asyncio.create_task(one(req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        for task in tasks:
            task.cancel()

    async with serve(handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


def ok(req: dict[str, Any], data: Any, worker: str = "w1") -> dict[str, Any]:
    """A successful requester-API answer to ``req``."""
    return {"request_id": req.get("request_id"), "success": True, "data": data,
            "error": None, "processed_by": worker}


def failed(req: dict[str, Any] | None, error: str) -> dict[str, Any]:
    """A failure answer (``req`` None: one that names no request)."""
    return {"request_id": None if req is None else req.get("request_id"), "success": False,
            "data": None, "error": error, "processed_by": None}
