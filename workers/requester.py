"""Requester client: send commands to the broker and get the workers' answers.

The requester socket speaks the seed's plain JSON API (see
:class:`workers.protocol.ApiRequest` and :class:`~workers.protocol.ApiResponse`).
One connection carries many requests at once; answers come back in whatever
order the workers finish and are matched by ``request_id``. So this client has a
single reader task that resolves one future per request, and any number of
callers can wait on the same connection.

Three ways in:

* :class:`Requester` – the asyncio API::

      async with Requester("ws://127.0.0.1:8766") as r:
          print(await r.call("calculate", a=10, b=20, op="+"))

* :class:`SyncRequester` – the same, blocking, for scripts and threads;
* ``python -m workers.requester HOST PORT [COMMAND [JSON]]`` – one request from
  the shell, or an interactive console like the seed's (:mod:`workers.request_cli`).

Nothing here imports Django: a requester machine needs only ``websockets``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import tracing
from .address import auth_headers, broker_url  # noqa: F401 (importers build URLs from here)
from .errors import (AllBusy, BrokerUnavailable, Cancelled, CommandFailed, ConnectionLost,
                     NoWorkers, Refused, RequestFailed, Timeout, WorkerLost, describe)
from .outbox import Outbox
from .protocol import (ApiRequest, ApiResponse, CloseCode, ErrorCode, ProtocolError,
                       loads_frames)

__all__ = ["AllBusy", "BrokerUnavailable", "Cancelled", "Chunk", "CommandFailed",
           "ConnectionLost", "Job", "NoWorkers", "Progress", "Refused", "RequestFailed",
           "Requester", "Result", "Route", "SyncRequester", "Timeout", "WorkerLost"]

logger = logging.getLogger("workers.requester")

T = TypeVar("T")

DEFAULT_PORT = 8766
#: The broker's default request timeout; a request without its own ``timeout`` gets this.
DEFAULT_TIMEOUT = 30.0
#: Extra time given to the broker beyond the request's timeout before we stop waiting:
#: the broker answers ``Worker response timeout`` itself, and that answer should win.
DEFAULT_MARGIN = 5.0
#: Frames we accept; the broker enforces its own (smaller) limit on what it sends.
MAX_FRAME_BYTES = 16 * 2**20
#: Close codes after which dialling again is no use: the credential is refused.
FINAL_CLOSE_CODES = frozenset({CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN})
#: What dialling the broker may raise when it cannot be reached (or refuses the handshake).
CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, InvalidURI)


# --------------------------------------------------------------------------- async client


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a request got: ``progress`` from 0 to 1 and/or a ``message``."""

    request_id: str
    progress: float | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """One partial result of a request (``seq`` counts from 0)."""

    request_id: str
    seq: int
    data: Any


@dataclass(frozen=True, slots=True)
class Result:
    """The last event of :meth:`Requester.stream`: the answer's data."""

    request_id: str
    data: Any
    response: ApiResponse


Event = Progress | Chunk | Result


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request may go (all optional): ``select``, labels its worker must have
    (``{"gpu": "a100"}``); ``affinity``, a key (requests with one key go to one worker
    while it is there: warm caches); ``hedge``, allow a second copy on another worker
    when the first is slower than the command's recent p95 (idempotent commands only).
    And the W3C ``traceparent`` it carries (default: the running OpenTelemetry span's,
    when OpenTelemetry is installed and configured).
    """

    select: dict[str, str] | None = None
    affinity: str | None = None
    hedge: bool = False
    traceparent: str | None = None


class _Call:
    """One request in flight: its answer to come, and what to do with its events."""

    __slots__ = ("request", "future", "accepted", "events", "chunks", "attaching", "watched")

    def __init__(self, request: ApiRequest, on_event: Callable[[Event], Any] | None) -> None:
        self.request = request
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[ApiResponse] = loop.create_future()
        #: Done once the broker stored it (its "accepted" event), if it was asked to say.
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.events = on_event
        self.chunks: list[Any] = []
        #: Re-attached after a reconnect: a broker that never had it gets it again.
        self.attaching = False
        #: Started elsewhere (:meth:`Requester.watch`): never sent from here.
        self.watched = False


class Job:
    """A request started with :meth:`Requester.start`: its answer, its events, its cancel."""

    def __init__(self, requester: Requester, call: _Call,
                 events: asyncio.Queue[Event] | None) -> None:
        self._requester = requester
        self._call = call
        self._events = events

    @property
    def request_id(self) -> str:
        return self._call.request.request_id

    async def result(self) -> Any:
        """The answer's data (a generator command's chunks, collected, if it streamed);
        raises a :class:`RequestFailed` subclass for a failure answer."""
        return _data_of(self._call, await self._requester._wait(self._call))

    async def cancel(self) -> None:
        """Ask the broker to stop it; its answer (:class:`Cancelled`) says when it did."""
        await self._requester._send_cancel(self.request_id)

    async def events(self) -> AsyncIterator[Event]:
        """Its progress and chunks as they come, then a :class:`Result` (needs
        ``stream=True`` at :meth:`~Requester.start`)."""
        if self._events is None:
            raise RuntimeError("start(..., stream=True) to get a job's events")
        waiting = asyncio.ensure_future(self._requester._wait(self._call))
        try:
            while True:
                getter = asyncio.ensure_future(self._events.get())
                done, _ = await asyncio.wait({getter, waiting},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not self._events.empty():  # what came before the answer
                    yield self._events.get_nowait()
                response = waiting.result()
                yield Result(self.request_id, _data_of(self._call, response), response)
                return
        finally:
            waiting.cancel()


def _data_of(call: _Call, response: ApiResponse) -> Any:
    if not response.success:
        raise RequestFailed.from_answer(response.error, response.code, response)
    if response.data is None and call.chunks:
        return list(call.chunks)
    return response.data


class _Calls(dict[str, _Call]):
    """A :class:`Requester`'s requests still waiting, by ``request_id``, and how each
    frame that arrives settles one of them.

    Apart from the requester, which owns the socket (dialling, re-dialling, sending):
    matching frames to calls needs no socket, and the table outlives a reconnect.
    """

    __slots__ = ("url", "resend", "said")

    def __init__(self, url: str, resend: Callable[[_Call], Any]) -> None:
        super().__init__()
        self.url = url  # for log lines and errors
        #: The broker's last word about the connection itself (an error about no request,
        #: sent before it closes: a revoked key, say), for the error that ends the calls.
        self.said = ""
        #: Sends a call's request again: re-attached, it was unknown (it never arrived).
        self.resend = resend

    def on_frame(self, raw: str | bytes) -> None:
        """Settle what a frame from the broker is about: an event, or an answer (or
        several of them, in a batch frame)."""
        try:
            objects = loads_frames(raw)
        except ProtocolError as exc:
            logger.warning("Unreadable frame from %s: %s", self.url, exc)
            return
        for obj in objects:
            self._on_object(obj)

    def _on_object(self, obj: Any) -> None:
        try:
            if not isinstance(obj, dict):
                raise ProtocolError("Each frame of a batch must be a JSON object")
            if "event" in obj:
                self._on_event(obj)
                return
            response = ApiResponse.from_dict(obj)
        except ProtocolError as exc:
            logger.warning("Unreadable frame from %s: %s", self.url, exc)
            return
        call = self._match(response)
        if call is None:
            logger.debug("Answer to unknown request %s dropped", response.request_id)
        elif response.code == ErrorCode.UNKNOWN_REQUEST.value and \
                not call.future.done() and response.request_id is not None:
            if call.watched:  # nothing to send: unknown is its answer
                call.future.set_result(response)
                return
            if call.attaching:  # re-attached, unknown: it never arrived; it goes now
                call.attaching = False
                self.resend(call)
                return
            # It finished too long ago for its answer to be kept.
            call.future.set_exception(ConnectionLost(
                f"Connection to {self.url} was lost and its answer with it: "
                f"{response.error}"))
        elif not call.future.done():
            call.future.set_result(response)

    def _on_event(self, obj: dict[str, Any]) -> None:
        call = self.get(obj.get("request_id"))  # type: ignore[arg-type]
        if call is None:
            return
        if obj["event"] == "accepted":
            if not call.accepted.done():
                call.accepted.set_result(None)
            return
        if obj["event"] == "chunk":
            event: Event = Chunk(call.request.request_id, obj.get("seq", 0), obj.get("data"))
            call.chunks.append(event.data)
        elif obj["event"] == "progress":
            event = Progress(call.request.request_id, obj.get("progress"), obj.get("message"))
        else:
            return
        if call.events is not None:
            try:
                call.events(event)
            except Exception:  # a caller's callback must not stop the reader
                logger.exception("on_event callback failed")

    def _match(self, response: ApiResponse) -> _Call | None:
        """The call an answer belongs to.

        The broker answers with ``request_id`` null only when it could not read
        the frame at all (for instance, one over its size limit). With exactly one
        call waiting, that call is the only frame it can be about; with several,
        nothing can be matched and the calls run into their wait limits.
        """
        if response.request_id is not None:
            return self.get(response.request_id)
        logger.warning("Broker refused a frame: %s", response.error)
        self.said = response.error or ""
        if len(self) == 1:
            return next(iter(self.values()))
        return None

    def fail_all(self, exc: Exception) -> None:
        """The connection is gone for good: every call still waiting fails with ``exc``."""
        for call in self.values():
            if not call.future.done():
                call.future.set_exception(exc)


class _Upkeep:
    """A :class:`Requester`'s connection over time: reading it, and when it drops,
    dialling again and re-attaching what still waits, or failing it all."""

    url: str
    reconnect: bool
    reconnect_for: float
    _ws: ClientConnection | None
    _calls: _Calls
    _lost: str | None
    _closing: bool
    _connected: asyncio.Event

    async def _dial(self) -> ClientConnection:
        raise NotImplementedError

    async def _run(self) -> None:
        """Read until the connection ends; then reconnect and re-attach, or fail all."""
        while True:
            reason = await self._read_loop(self._ws)  # type: ignore[arg-type]
            self._connected.clear()
            refused = self._ws is not None and self._ws.close_code in FINAL_CLOSE_CODES
            if self._closing or not self.reconnect or refused or \
                    not await self._redial(reason):
                self._lost = f"{reason}: {self._calls.said}" if refused and self._calls.said \
                    else reason
                reason = self._lost
                logger.debug("Connection to %s ended: %s", self.url, reason)
                self._calls.fail_all(ConnectionLost(f"Connection to {self.url} lost: {reason}"))
                return

    async def _redial(self, reason: str) -> bool:
        """Dial again with backoff for up to ``reconnect_for`` seconds; re-attach the calls
        still waiting (the broker kept them running, and keeps their answers)."""
        logger.warning("Connection to %s lost (%s); reconnecting", self.url, reason)
        loop = asyncio.get_running_loop()
        give_up, delay = loop.time() + self.reconnect_for, 0.1
        while loop.time() < give_up:
            try:
                self._ws = await self._dial()
            except CONNECT_ERRORS:
                await asyncio.sleep(min(delay, max(0.0, give_up - loop.time())))
                delay = min(delay * 2, 2.0)
                continue
            try:
                for call in list(self._calls.values()):
                    call.attaching = True
                    await self._ws.send(json.dumps({"attach": call.request.request_id,
                                                    "stream": call.events is not None}))
            except ConnectionClosed:  # refused or dropped at once: try again
                await asyncio.sleep(min(delay, max(0.0, give_up - loop.time())))
                delay = min(delay * 2, 2.0)
                continue
            self._connected.set()
            logger.info("Reconnected to %s; re-attached %d request(s)", self.url,
                        len(self._calls))
            return True
        return False

    async def _read_loop(self, ws: ClientConnection) -> str:
        """Resolve waiting calls as answers arrive; return why the connection ended."""
        try:
            async for raw in ws:
                self._calls.on_frame(raw)
            return _close_reason(ws)
        except ConnectionClosed as exc:
            return describe(exc)


class Requester(_Upkeep):
    """An asyncio client of the requester API; one connection, many requests in flight.

    ``default_timeout`` is what the client assumes the broker allows a request
    that names no timeout of its own (the broker's default is 30 s); the client
    waits that long plus ``margin`` before giving up with :class:`TimeoutError`,
    so nothing waits forever even if the broker never answers.

    ``reconnect``: when the connection drops, dial again (with backoff, for up to
    ``reconnect_for`` seconds) and re-attach every request still waiting, so that
    calls in flight get their answers (the broker keeps them). Without it, or when
    the broker does not come back in time, waiting calls fail with
    :class:`ConnectionLost`.

    ``batch``: requests sent in the same turn of the loop while others are in flight go
    in one frame (a JSON array), and the broker answers them in batch frames too: a
    frame less each way per request is most of what a request costs the broker. A lone
    request goes at once. Off for a broker that takes one request per frame.
    """

    def __init__(self, url: str, *, token: str | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT,
                 margin: float = DEFAULT_MARGIN, open_timeout: float = 10.0,
                 reconnect: bool = True, reconnect_for: float = 30.0,
                 batch: bool = True) -> None:
        self.url = url
        self.batch = batch
        self._outbox: Outbox | None = None
        self.token = token
        self.default_timeout = default_timeout
        self.margin = margin
        self.open_timeout = open_timeout
        self.reconnect = reconnect
        self.reconnect_for = reconnect_for
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._calls = _Calls(url, self._resend)
        self._sending: set[asyncio.Task[None]] = set()  # frames on their way
        self._lost: str | None = None
        self._closing = False
        self._connected = asyncio.Event()

    async def connect(self) -> Requester:
        """Open the connection; raises ``OSError``/``InvalidHandshake``/``TimeoutError``."""
        self._ws = await self._dial()
        self._lost = None
        self._closing = False
        self._connected.set()
        self._reader = asyncio.create_task(self._run(), name="workers.requester reader")
        logger.debug("Connected to %s", self.url)
        return self

    async def _dial(self) -> ClientConnection:
        return await connect(self.url, max_size=MAX_FRAME_BYTES,
                             open_timeout=self.open_timeout,
                             additional_headers=auth_headers(self.token))

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with :class:`ConnectionLost`.
        Returns at once when the broker is gone (it stops dialling it again)."""
        self._closing = True
        if self._reader is not None and not self._connected.is_set():
            self._reader.cancel()  # reconnecting: no connection to close
        elif self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            try:
                await self._reader
            except asyncio.CancelledError:
                if not self._reader.cancelled():
                    raise  # the caller was cancelled, not the reader
                self._calls.fail_all(ConnectionLost(f"Connection to {self.url} closed"))
            self._reader = None

    async def __aenter__(self) -> Requester:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._calls)

    async def request(self, command: str, data: dict[str, Any] | None = None, *,
                      timeout: float | None = None, priority: int = 0,
                      on_event: Callable[[Event], Any] | None = None,
                      route: Route | None = None,
                      not_before: float | datetime | None = None,
                      request_id: str | None = None) -> ApiResponse:
        """Send one command and return the broker's answer, successful or not.

        ``timeout`` (seconds) is passed to the broker, which answers
        ``Worker response timeout`` when it runs out. ``on_event`` asks for the
        request's progress and chunks, and is called with each (:class:`Progress`,
        :class:`Chunk`). Cancelling the task that awaits this cancels the request at
        the broker too. Raises :class:`ConnectionLost` if the connection is or goes
        down before the answer (and does not come back), and :class:`TimeoutError`
        if no answer came within ``timeout`` (or ``default_timeout``) plus ``margin``.
        ``not_before`` (unix seconds or an aware datetime) defers it: the timeout counts
        from then.
        """
        call = await self._send(command, data, timeout, priority, on_event, route,
                                not_before=unix_seconds(not_before), request_id=request_id)
        return await self._wait(call)

    async def call(self, command: str, /, *, timeout: float | None = None,
                   on_progress: Callable[[Progress], Any] | None = None,
                   priority: int = 0, route: Route | None = None, **data: Any) -> Any:
        """Send one command with ``data`` as keyword arguments; return the answer's data.

        ``on_progress`` is called with each :class:`Progress` the worker reports (a
        streaming command's chunks are then collected into the data returned).
        Raises a :class:`RequestFailed` when the answer is a failure: the subclass
        for its code (:class:`NoWorkers`, :class:`Timeout`, :class:`WorkerLost`,
        :class:`Cancelled`, :class:`CommandFailed`...). ``route`` says where it may
        go (:class:`Route`). Use :meth:`request` to pass a parameter that is itself
        called ``timeout`` (or ``route``).
        """
        def progress_only(event: Event) -> None:
            if isinstance(event, Progress):
                on_progress(event)  # type: ignore[misc]

        call = await self._send(command, data, timeout, priority,
                                progress_only if on_progress is not None else None, route)
        return _data_of(call, await self._wait(call))

    async def start(self, command: str, data: dict[str, Any] | None = None, *,
                    timeout: float | None = None, priority: int = 0,
                    stream: bool = False, route: Route | None = None,
                    not_before: float | datetime | None = None,
                    wait_for_workers: bool = False, keep: float | None = None,
                    request_id: str | None = None, task: str | None = None) -> Job:
        """Start a request and return its :class:`Job` (``job.result()``, ``job.cancel()``,
        and with ``stream`` ``job.events()``) once the broker has stored it: from then
        on no broker restart or crash loses it (or once it is answered, if sooner).

        A queued job: ``not_before`` (unix seconds or an aware datetime) defers it (its
        timeout counts from then); ``wait_for_workers`` waits for a worker offering the
        command instead of failing ``no_workers``; ``keep`` keeps its answer that many
        seconds (when longer than the broker's RESULT_TTL) for ``attach``; ``task``
        names the Django task it runs (see :mod:`dispatch.tasks`)."""
        queue: asyncio.Queue[Event] | None = asyncio.Queue() if stream else None
        call = await self._send(command, data, timeout, priority,
                                queue.put_nowait if queue is not None else None, route,
                                accepted=True, not_before=unix_seconds(not_before),
                                wait_for_workers=wait_for_workers, keep=keep,
                                request_id=request_id, task=task)
        try:
            async with asyncio.timeout(self._limit(call)):
                await asyncio.wait({call.accepted, call.future},
                                   return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._calls.pop(call.request.request_id, None)
            raise TimeoutError(f"'{command}' was not accepted by {self.url} within "
                               f"{self._limit(call):.1f}s") from None
        return Job(self, call, queue)

    async def watch(self, request_id: str, *, timeout: float | None = None) -> Job:
        """A :class:`Job` for a request that this credential started elsewhere (another
        connection, another process): ``job.events()`` gives its progress from now on,
        then its result. One unknown to the broker (or answered longer ago than its
        answer is kept) fails with :class:`~workers.errors.Refused` (``unknown_request``).
        ``timeout``: how long to wait for its answer (default ``default_timeout``)."""
        ws = await self._connection()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        call = self._calls.get(request_id)
        if call is not None:  # sent from here, still waited for: one call, one answer
            call.events = call.events or queue.put_nowait
        else:
            call = _Call(ApiRequest("(watched)", request_id=request_id, timeout=timeout,
                                    stream=True), queue.put_nowait)
            call.watched = True
            self._calls[request_id] = call
        try:
            await ws.send(json.dumps({"attach": request_id, "stream": True}))
        except ConnectionClosed:
            pass  # attached again once reconnected
        return Job(self, call, queue)

    async def stream(self, command: str, /, *, timeout: float | None = None,
                     priority: int = 0, route: Route | None = None,
                     **data: Any) -> AsyncIterator[Event]:
        """``async for event in broker.stream("cmd", ...)``: the request's progress and
        chunks as they come, then its :class:`Result`; a failure raises."""
        job = await self.start(command, data, timeout=timeout, priority=priority, stream=True,
                               route=route)
        try:
            async for event in job.events():
                yield event
        except asyncio.CancelledError:
            await self._send_cancel(job.request_id)
            raise

    # -- internals

    async def _send(self, command: str, data: dict[str, Any] | None, timeout: float | None,
                    priority: int, on_event: Callable[[Event], Any] | None,
                    route: Route | None, accepted: bool = False,
                    request_id: str | None = None, **later: Any) -> _Call:
        ws = await self._connection()
        route = route or Route()
        req = ApiRequest(command, dict(data or {}), timeout=timeout,
                         stream=on_event is not None, priority=priority,
                         select=dict(route.select or {}), affinity=route.affinity,
                         hedge=route.hedge,
                         traceparent=route.traceparent or tracing.current_traceparent(),
                         accepted=accepted, **later)
        if request_id is not None:
            req.request_id = request_id
        call = self._calls[req.request_id] = _Call(req, on_event)
        if not await self._put(ws, req.to_json()) and not self.reconnect:
            # (with reconnect it is sent again, as an attach, once reconnected)
            del self._calls[req.request_id]
            raise ConnectionLost(f"Connection to {self.url} lost")
        return call

    async def _put(self, ws: ClientConnection, text: str) -> bool:
        """Send a request's frame, or gather it with the others of this turn (batch)."""
        if self._outbox is None or self._outbox.ws is not ws:
            self._outbox = Outbox(ws, self._spawn,
                                  lambda: self.batch and len(self._calls) > 1)
        return await self._outbox.send(text)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return task

    async def _connection(self) -> ClientConnection:
        if self._ws is None:
            raise ConnectionLost(f"Not connected to {self.url}; use 'async with' or connect()")
        if self._closing:  # closed by its owner: no reconnect will come
            raise ConnectionLost(f"Connection to {self.url} closed")
        if self._lost is not None:
            raise ConnectionLost(f"Connection to {self.url} lost: {self._lost}")
        if not self._connected.is_set():  # reconnecting
            try:
                async with asyncio.timeout(self.reconnect_for):
                    await self._connected.wait()
            except TimeoutError:
                raise ConnectionLost(f"Not connected to {self.url}") from None
            return await self._connection()
        return self._ws

    def _limit(self, call: _Call) -> float:
        """How long to wait for a call: the broker's own limit for it, and a margin."""
        timeout = call.request.timeout
        return (self.default_timeout if timeout is None else timeout) + self.margin

    def _resend(self, call: _Call) -> None:
        """Send a request again, with its id: unknown after a reconnect, it never arrived
        (a broker that has it attaches this to it instead: it never runs twice)."""
        async def send() -> None:
            try:
                if self._ws is not None:
                    await self._ws.send(call.request.to_json())
            except ConnectionClosed:
                pass  # the next reconnect attaches it again

        self._spawn(send())

    async def _wait(self, call: _Call) -> ApiResponse:
        """Wait for the answer, but never longer than the broker's own limit plus a
        margin; a cancelled wait cancels the request."""
        limit = self._limit(call)
        try:
            async with asyncio.timeout(limit):
                return await asyncio.shield(call.future)
        except TimeoutError:
            raise TimeoutError(f"No answer to '{call.request.command}' from {self.url} "
                               f"within {limit:.1f}s") from None
        except asyncio.CancelledError:
            if not call.future.done():
                await self._send_cancel(call.request.request_id)
            raise
        finally:
            self._calls.pop(call.request.request_id, None)

    async def _send_cancel(self, request_id: str) -> None:
        if self._ws is not None and self._connected.is_set():
            try:
                await self._ws.send(json.dumps({"cancel": request_id}))
            except ConnectionClosed:
                pass


def _close_reason(ws: ClientConnection) -> str:
    code, text = ws.close_code, ws.close_reason
    if code is None:
        return "connection closed"
    return f"closed by broker (code {code}{': ' + text if text else ''})"


# --------------------------------------------------------------------------- sync wrapper


def unix_seconds(moment: float | datetime | None) -> float | None:
    """Unix seconds of a moment given either way (a naive datetime is refused: whose
    time zone would it be?)."""
    if moment is None or not isinstance(moment, datetime):
        return moment
    if moment.tzinfo is None:
        raise ValueError("not_before: give an aware datetime (with a time zone)")
    return moment.timestamp()


class SyncRequester:
    """:class:`Requester` for code without an event loop.

    A private event loop runs in a daemon thread; every method hands a coroutine
    to it and blocks until it is done. Calls from several threads may overlap:
    they share the one connection, as concurrent async calls do.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="workers.requester loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._requester = self._run(self._open(url, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _open(url: str, options: dict[str, Any]) -> Requester:
        return await Requester(url, **options).connect()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def request(self, command: str, data: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> ApiResponse:
        """Blocking :meth:`Requester.request`."""
        return self._run(self._requester.request(command, data, timeout=timeout))

    def call(self, command: str, /, *, timeout: float | None = None,
             on_progress: Callable[[Progress], Any] | None = None, priority: int = 0,
             **data: Any) -> Any:
        """Blocking :meth:`Requester.call` (``on_progress`` runs on the client's thread)."""
        return self._run(self._requester.call(command, timeout=timeout,
                                              on_progress=on_progress, priority=priority,
                                              **data))

    def close(self) -> None:
        """Close the connection and stop the background loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._requester.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncRequester:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


if __name__ == "__main__":  # the CLI has its own module; this keeps `python -m` working
    from .request_cli import main
    sys.exit(main())
