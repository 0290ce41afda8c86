"""What a running command knows about its request, and how it talks back.

A handler that declares a keyword-only ``ctx`` parameter gets a :class:`JobContext`::

    @command(lease=60)
    async def train(epochs: int, *, ctx: JobContext) -> dict:
        for epoch in range(epochs):
            if ctx.cancelled or ctx.time_left() < 5:
                break
            ...
            await ctx.progress(epoch / epochs, f"epoch {epoch}")  # also shows it lives
        return {"epochs": epoch + 1}

An async handler that is cancelled gets ``CancelledError`` at its next ``await``; a
plain ``def`` handler runs in a thread, cannot be interrupted, and is expected to
look at ``ctx.cancelled``; from a thread, call ``ctx.progress(...)`` without
``await``. A generator handler (async or not) streams: each ``yield`` is one chunk.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from .protocol import CHUNK_WINDOW, Message
#: Progress frames of one job are sent at most this often (the newest wins).
PROGRESS_EVERY = 0.05

Send = Callable[[Message], Awaitable[bool]]


class _Done:
    """What ``progress`` returns: awaitable on the loop, ignorable in a thread."""

    def __await__(self) -> Any:
        return iter(())


_DONE = _Done()


class JobContext:
    """The context of one request a worker runs."""

    def __init__(self, request_id: str, *, time_left: float | None, stream: bool,
                 lease: float | None, send: Send, loop: asyncio.AbstractEventLoop,
                 traceparent: str | None = None) -> None:
        self.request_id = request_id
        #: The requester's W3C trace context, if it sent one: for the handler's own spans
        #: and logs (``opentelemetry.propagate.extract({"traceparent": ...})``).
        self.traceparent = traceparent
        #: Whether the requester asked for progress and chunks (else they are not sent).
        self.stream = stream
        #: Seconds within which the job must show life, if its command has a lease.
        self.lease = lease
        #: When the request's deadline passes, in ``loop.time()``; None: not told.
        self.deadline = None if time_left is None else loop.time() + time_left
        self.cancel_reason: str | None = None
        self._send = send
        self._loop = loop
        self._cancelled = threading.Event()  # read from handler threads
        self._credit = asyncio.Semaphore(CHUNK_WINDOW)
        self._unacked = 0  # chunks sent and not acknowledged
        self._seq = 0
        self._last_progress = 0.0
        self._later: asyncio.TimerHandle | None = None
        self._newest: Message | None = None
        self._sending: set[asyncio.Task[Any]] = set()  # keeps fire-and-forget sends alive

    @property
    def cancelled(self) -> bool:
        """True once the requester (or an operator) cancelled this request."""
        return self._cancelled.is_set()

    def time_left(self) -> float | None:
        """Seconds until the request's deadline (negative once past); None if not told."""
        if self.deadline is None:
            return None
        return self.deadline - self._loop.time()

    def progress(self, fraction: float | None = None, message: str | None = None) -> _Done:
        """Report how far the job got (0-1) and/or what it does now; shows it lives.

        Sent at most every PROGRESS_EVERY seconds (the newest report wins); the broker
        passes it on to requesters that asked for it. It also shows the job lives.
        ``await`` it in an async handler; in a thread, just call it.
        """
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        # Sent even when the requester did not ask: another connection of its may
        # attach to the request later, and get the rest of its progress.
        self._call(self._report, Message.progress(self.request_id, fraction, message))
        return _DONE

    def heartbeat(self) -> _Done:
        """Show that the job lives (for a command with a lease); no progress to tell."""
        if self.lease is not None:
            self._call(self._report, Message.progress(self.request_id))
        return _DONE

    async def send_chunk(self, data: Any) -> None:
        """One partial result to a requester that asked; waits while CHUNK_WINDOW are
        unacknowledged. (Generator handlers do this for each ``yield``.)"""
        await self._credit.acquire()
        self._unacked += 1
        seq, self._seq = self._seq, self._seq + 1
        # Held while away from the broker, it still counts against the window: a job
        # cannot pile up more while nobody reads (the window starts afresh on resume).
        await self._send(Message.chunk(self.request_id, seq, data))

    # ------------------------------------------------------------------ from the session

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancelled.set()

    def acked(self, seq: int) -> None:
        if self._unacked:
            self._unacked -= 1
            self._credit.release()

    def resumed(self) -> None:
        """On a new connection: the chunks in flight on the old one will get no
        acknowledgement; the window starts afresh."""
        for _ in range(self._unacked):
            self._credit.release()
        self._unacked = 0

    async def settle(self) -> None:
        """The job ended: what it reported goes out before its answer. (A report held
        back by PROGRESS_EVERY would otherwise be lost: the requester's last figure
        would be 80% of a job that reached 100%.)"""
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._newest is not None:
            msg, self._newest = self._newest, None
            await self._send(msg)

    # ------------------------------------------------------------------ plumbing

    def _call(self, func: Callable[..., Any], *args: Any) -> None:
        """On the loop: now; from a handler's thread: handed to the loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    def _report(self, msg: Message) -> None:
        """Send now, or keep the newest for when PROGRESS_EVERY has passed."""
        now = self._loop.time()
        wait = self._last_progress + PROGRESS_EVERY - now
        if wait <= 0 and self._later is None:
            self._last_progress = now
            self._spawn_send(msg)
            return
        self._newest = msg
        if self._later is None:
            self._later = self._loop.call_later(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        self._later = None
        if self._newest is not None:
            msg, self._newest = self._newest, None
            self._last_progress = self._loop.time()
            self._spawn_send(msg)

    def _spawn_send(self, msg: Message) -> None:
        task = self._loop.create_task(self._send(msg))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
