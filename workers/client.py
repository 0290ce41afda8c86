"""The worker runtime: dial out to the broker, register, stay alive, run commands.

A :class:`Worker` keeps one WebSocket connection to the broker at a time. On each
new connection it registers (a ``connect`` frame listing its commands), then runs
three things side by side until the connection ends:

* a reader that answers pings and starts one task per ``request``;
* a heartbeat that reports how many requests are in flight;
* a watch for :meth:`Worker.stop`.

When the connection ends for any reason other than a stop, it reconnects with
exponential backoff, rotating through the broker URLs it was given, and
registers again under the same worker id.

Only ``websockets`` is needed: this module must never import Django or the broker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import socket
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import process_exception
from websockets.exceptions import ConnectionClosed, InvalidURI
from websockets.uri import parse_uri

from .handlers import CommandRegistry, run_safely
from .protocol import (Message, MessageType, ProtocolError, Registration, RequestBody,
                       ResponseBody, random_id)
from .requester import ConnectionLost, RequestFailed, auth_headers, describe

logger = logging.getLogger("workers.client")

#: Used until the broker states its own interval in its answer to ``connect``.
DEFAULT_HEARTBEAT_INTERVAL = 5.0
#: Heartbeat intervals of silence after which the connection is presumed dead.
DEAD_AFTER_MISSES = 3
#: Seconds the broker has to answer our ``connect`` frame.
REGISTER_TIMEOUT = 10.0
OPEN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
#: We accept big frames; the broker enforces its own limit (1 MiB by default).
MAX_FRAME_BYTES = 16 * 2**20

SHUTTING_DOWN = "Worker shutting down"
STOPPED = "Worker stopped before the command finished"

#: Frame types the worker handles itself; :meth:`Worker.on` refuses them.
RESERVED_TYPES = frozenset({MessageType.CONNECT.value, MessageType.DISCONNECT.value,
                            MessageType.HEARTBEAT.value, MessageType.REQUEST.value,
                            MessageType.RESPONSE.value})

#: ``fn(message)``, sync or async; may return a :class:`Message` to send back.
MessageHandler = Callable[[Message], Any]


class RegistrationFailed(Exception):
    """The broker answered our ``connect`` frame with an ``error``, or not at all."""


def backoff(initial: float, maximum: float, factor: float = 2.0) -> Iterator[float]:
    """Delays between connection attempts: exponential, capped, with jitter.

    websockets' reconnecting ``async for ws in connect(uri)`` was the first
    choice, and its delays can be injected (``reconnect_delays``), but it does
    not fit a worker:

    * it follows one URI, and its backoff lives inside that iterator, so it
      cannot rotate through several brokers with one backoff schedule;
    * it resets the backoff as soon as the WebSocket handshake succeeds, so a
      broker that accepts the socket and then refuses the registration (or
      drops it at once) would be redialled in a tight loop;
    * it stops at errors it deems fatal (an HTTP 404 while a proxy or the
      broker is restarting), where a worker should keep trying.

    So the worker dials each attempt with websockets' plain ``connect()``, uses
    its ``process_exception`` to tell transient from suspicious errors, and
    takes its delays from here. The first delay is random in ``[0, initial]``
    (RFC 6455 §7.2.3: spread out a crowd of workers reconnecting after a broker
    restart); later ones double up to ``maximum``, each drawn from the upper
    half of its range.
    """
    yield random.uniform(0, initial)
    delay = initial
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * factor, maximum)


def check_url(url: str) -> str:
    """Reject anything that is not a ``ws://`` or ``wss://`` URL, before dialling it."""
    try:
        parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"Not a WebSocket URL: {url!r} ({exc})") from None
    return url


def default_name() -> str:
    """``<hostname>-<pid>``: tells apart several workers on one machine."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """A worker that serves the commands of a registry to a broker.

    ``urls``: one broker URL or several; each reconnect dials the next one.
    ``registry``: the commands to serve (default: :data:`workers.handlers.registry`
    with the built-ins loaded). ``heartbeat_interval`` is used until the broker
    says its own. ``backoff_initial``/``backoff_max`` bound the reconnect delays.
    ``stop_timeout`` is how long :meth:`stop` lets requests in flight finish.

    A worker runs once: after :meth:`stop`, make a new one.
    """

    def __init__(self, urls: str | Sequence[str], *, name: str | None = None,
                 weight: float = 1.0, max_concurrency: int = 16,
                 registry: CommandRegistry | None = None,
                 heartbeat_interval: float | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 30.0,
                 stop_timeout: float = 30.0, token: str | None = None) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("At least one broker URL is needed")
        if not weight > 0 or max_concurrency < 1:
            raise ValueError("weight must be > 0 and max_concurrency at least 1")
        self.urls = [check_url(u) for u in url_list]
        self.name = name or default_name()
        self.weight = float(weight)
        self.max_concurrency = max_concurrency
        self.registry = registry if registry is not None else _default_registry()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self.token = token
        #: Set while registered with a broker; cleared when the connection ends.
        self.connected = asyncio.Event()

        self._worker_id = random_id()
        self._interval = heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL
        self._slots = asyncio.Semaphore(max_concurrency)
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._dispatch_table: dict[str, Callable[[ClientConnection, Message], Any]] = {
            MessageType.HEARTBEAT.value: self._on_heartbeat,
            MessageType.REQUEST.value: self._on_request,
            MessageType.RESPONSE.value: self._on_response,
            MessageType.NOTIFICATION.value: self._on_notification,
            MessageType.ERROR.value: self._on_error,
            MessageType.CONNECT.value: self._on_late_connect,
        }
        self._ws: ClientConnection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._pending: dict[str, asyncio.Future[ResponseBody]] = {}
        self._last_ping: tuple[str, float] | None = None
        self._url_index = 0
        self._stop_requested = asyncio.Event()
        self._stop_deadline = stop_timeout
        self._finished: asyncio.Event | None = None

    # ------------------------------------------------------------------ public API

    @property
    def worker_id(self) -> str:
        """Our id: made once per Worker, replaced by the one the broker assigns."""
        return self._worker_id

    @property
    def heartbeat_interval(self) -> float:
        return self._interval

    @property
    def in_flight(self) -> int:
        """Requests being run right now."""
        return self._in_flight

    def on(self, kind: str) -> Callable[[MessageHandler], MessageHandler]:
        """Decorator: call ``fn(message)`` for every frame of type ``kind``.

        For ``custom`` or your own types, and to hear about ``notification`` and
        ``error`` frames (which are logged anyway). Async handlers run on the
        loop, plain functions in a thread. A handler that returns a
        :class:`Message` has it sent to the broker; one that raises on a frame of
        your own type gets the broker an ``error`` frame about it.
        """
        if kind in RESERVED_TYPES:
            raise ValueError(f"Frames of type '{kind}' are handled by the worker itself")

        def register(func: MessageHandler) -> MessageHandler:
            self._handlers.setdefault(kind, []).append(func)
            return func

        return register

    async def request(self, action: str, params: dict[str, Any] | None = None, *,
                      timeout: float = 10.0) -> Any:
        """Ask the broker to run one of its own actions (``get_time``, ``calculate``...).

        Waits for a connection if there is none yet, all within ``timeout``.
        Returns the answer's data; raises :class:`RequestFailed` for a failure
        answer, :class:`ConnectionLost` if the connection drops first, and
        :class:`TimeoutError` when ``timeout`` runs out.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
                body = await self._ask(self._require_ws(), Message.request(action, params))
        except TimeoutError:
            raise TimeoutError(f"No answer to '{action}' within {timeout}s") from None
        if not body.success:
            raise RequestFailed(body.error or "Request failed", body)
        return body.data

    async def run(self) -> None:
        """Serve until :meth:`stop`: connect, register, work, reconnect when the link drops."""
        if self._finished is not None:
            raise RuntimeError("Worker.run() was already called; a worker runs once")
        self._finished = asyncio.Event()
        delays: Iterator[float] | None = None
        try:
            while not self._stop_requested.is_set():
                url = self._next_url()
                registered, reason = await self._session_unless_stopped(url)
                if self._stop_requested.is_set():
                    break
                if registered or delays is None:
                    delays = backoff(self.backoff_initial, self.backoff_max)
                delay = next(delays)
                logger.info("%s: %s; reconnecting in %.2fs to %s",
                            url, reason, delay, self.urls[self._url_index])
                await self._sleep_unless_stopped(delay)
        except asyncio.CancelledError:
            for task in self._tasks:
                task.cancel()
            raise
        finally:
            await self._finish_tasks(self._stop_deadline)
            self._finished.set()
            logger.info("Worker %s stopped", self._worker_id)

    async def stop(self, timeout: float | None = None) -> None:
        """Leave gracefully and return once :meth:`run` has returned.

        Tells the broker (``disconnect``), refuses new requests, lets requests in
        flight finish for up to ``timeout`` seconds (default ``stop_timeout``)
        and cancels the rest, which are answered with an error. Safe to call
        from a handler of this worker: then it does not wait for itself.
        """
        if timeout is not None:
            self._stop_deadline = timeout
        self._stop_requested.set()
        if self._finished is None or asyncio.current_task() in self._tasks:
            return
        await self._finished.wait()

    # ------------------------------------------------------------------ connection

    def _next_url(self) -> str:
        url = self.urls[self._url_index]
        self._url_index = (self._url_index + 1) % len(self.urls)
        return url

    async def _session_unless_stopped(self, url: str) -> tuple[bool, str]:
        """A session, abandoned if :meth:`stop` comes while still dialling or registering.

        Once registered, the session sees the stop itself and leaves gracefully;
        before that there is nothing to finish, and waiting out a slow dial or an
        unanswered ``connect`` would only delay the stop.
        """
        session = asyncio.create_task(self._session(url))
        stopper = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not session.done() and not self.connected.is_set():
                session.cancel()
                await asyncio.wait({session})
                return False, "stopped"
            return await session
        except asyncio.CancelledError:
            session.cancel()
            raise
        finally:
            stopper.cancel()

    async def _session(self, url: str) -> tuple[bool, str]:
        """One connection from dial to close; returns (registered?, why it ended)."""
        registered = False
        try:
            async with connect(url, max_size=MAX_FRAME_BYTES, open_timeout=OPEN_TIMEOUT,
                               close_timeout=CLOSE_TIMEOUT, ping_interval=None,
                               additional_headers=auth_headers(self.token)) as ws:
                await self._register(ws)
                registered = True
                return True, await self._serve(ws)
        except RegistrationFailed as exc:
            logger.error("Registration of worker %s with %s failed: %s", self._worker_id, url, exc)
            return False, "registration failed"
        except ConnectionClosed as exc:
            return registered, f"connection closed ({describe(exc)})"
        except Exception as exc:  # the worker outlives any failure and keeps trying
            if registered:
                logger.exception("Session with %s failed", url)
                return True, f"session failed ({describe(exc)})"
            if process_exception(exc) is not None:
                logger.warning("%s looks misconfigured, retrying anyway: %s", url, describe(exc))
            return registered, f"cannot connect ({describe(exc)})"

    async def _register(self, ws: ClientConnection) -> None:
        """Send ``connect`` and adopt the id and heartbeat interval the broker answers with."""
        registration = Registration(self._worker_id, self.name, self.registry.names(),
                                    self.weight, self.max_concurrency,
                                    self.registry.not_idempotent())
        try:
            await ws.send(Message(MessageType.CONNECT.value, registration.to_data()).to_json())
        except ConnectionClosed:
            pass  # refused at once (credentials): the broker's reason is still to be read
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                while True:
                    msg = await self._receive(ws)
                    if msg is None:
                        continue
                    if msg.type == MessageType.CONNECT.value:
                        self._adopt(msg.data)
                        return
                    if msg.type == MessageType.ERROR.value:
                        raise RegistrationFailed(msg.data.get("error") or "no reason given")
                    await self._dispatch(ws, msg)
        except TimeoutError:
            raise RegistrationFailed(
                f"no answer to 'connect' within {REGISTER_TIMEOUT:.0f}s") from None

    def _adopt(self, data: dict[str, Any]) -> None:
        worker_id, interval = data.get("worker_id"), data.get("heartbeat_interval")
        if isinstance(worker_id, str) and worker_id:
            self._worker_id = worker_id
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            self._interval = float(interval)
        logger.info("Registered as %s (%s) with %d commands; heartbeat every %.1fs",
                    self._worker_id, self.name, len(self.registry.names()), self._interval)

    async def _serve(self, ws: ClientConnection) -> str:
        """Read, beat and watch for stop until one of them ends the session."""
        self._ws = ws
        self.connected.set()
        reader = asyncio.create_task(self._read_loop(ws))
        beater = asyncio.create_task(self._heartbeat_loop(ws))
        stopper = asyncio.create_task(self._stop_requested.wait())
        try:
            done, _ = await asyncio.wait({reader, beater, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                await self._leave(ws)
                return "stopped"
            return reader.result() if reader in done else beater.result()
        finally:
            self.connected.clear()
            self._ws = None
            for task in (reader, beater, stopper):
                task.cancel()
            await asyncio.gather(reader, beater, stopper, return_exceptions=True)
            self._fail_pending(ConnectionLost("Connection to the broker lost"))

    async def _leave(self, ws: ClientConnection) -> None:
        """Graceful stop on a live connection: say goodbye, drain, close."""
        logger.info("Stopping: leaving the broker, %d request(s) in flight", self._in_flight)
        await self._send(ws, Message(MessageType.DISCONNECT.value,
                                     {"reason": "worker stopping"}).to_json())
        await self._finish_tasks(self._stop_deadline)
        await ws.close()

    async def _sleep_unless_stopped(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop_requested.wait(), delay)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ reading

    async def _read_loop(self, ws: ClientConnection) -> str:
        """Hand every frame to its handler; return why the connection ended."""
        while True:
            dead_after = DEAD_AFTER_MISSES * self._interval
            try:
                async with asyncio.timeout(dead_after):
                    msg = await self._receive(ws)
            except TimeoutError:
                logger.warning("Nothing from the broker for %.1fs; dropping the connection",
                               dead_after)
                await ws.close()
                return "broker silent"
            except ConnectionClosed as exc:
                return f"connection closed ({describe(exc)})"
            if msg is None:
                continue
            if msg.type == MessageType.DISCONNECT.value:
                logger.warning("Broker is going away: %s", msg.data.get("reason") or "no reason")
                await ws.close()
                return "broker sent disconnect"
            await self._dispatch(ws, msg)

    async def _receive(self, ws: ClientConnection) -> Message | None:
        """Next frame, or None for one that does not parse (already answered with an error)."""
        raw = await ws.recv()
        try:
            return Message.from_json(raw)
        except ProtocolError as exc:
            logger.warning("Unreadable frame from the broker: %s", exc)
            await self._send(ws, Message.error(f"Unreadable frame: {exc}").to_json())
            return None

    async def _dispatch(self, ws: ClientConnection, msg: Message) -> None:
        handler = self._dispatch_table.get(msg.type)
        if handler is not None:
            result = handler(ws, msg)
            if inspect.isawaitable(result):
                await result
        elif msg.type in self._handlers:
            self._run_handlers(ws, msg, reply_on_error=True)
        else:
            logger.warning("Frame of unknown type '%s' from the broker", msg.type)
            await self._send(ws, Message.error(f"Unknown message type '{msg.type}'",
                                               reply_to=msg.msg_id).to_json())

    async def _on_heartbeat(self, ws: ClientConnection, msg: Message) -> None:
        ack = msg.data.get("ack")
        if ack is None:
            await self._send(ws, Message.heartbeat(ack=msg.msg_id,
                                                   in_flight=self._in_flight).to_json())
        elif self._last_ping is not None and ack == self._last_ping[0]:
            rtt = asyncio.get_running_loop().time() - self._last_ping[1]
            logger.debug("Heartbeat round trip %.1f ms", rtt * 1000)

    def _on_response(self, ws: ClientConnection, msg: Message) -> None:
        try:
            body = ResponseBody.from_message(msg)
        except ProtocolError as exc:
            logger.warning("Unreadable response from the broker: %s", exc)
            return
        future = self._pending.get(body.request_id)
        if future is None or future.done():
            logger.debug("Late or unknown response to %s dropped", body.request_id)
        else:
            future.set_result(body)

    def _on_notification(self, ws: ClientConnection, msg: Message) -> None:
        logger.info("Notification from the broker: %s", msg.data.get("message"))
        self._run_handlers(ws, msg, reply_on_error=False)

    def _on_error(self, ws: ClientConnection, msg: Message) -> None:
        error, reply_to = msg.data.get("error"), msg.data.get("reply_to")
        logger.warning("Error from the broker: %s (about %s)", error, reply_to)
        future = self._pending.get(reply_to) if isinstance(reply_to, str) else None
        if future is not None and not future.done():
            future.set_result(ResponseBody(reply_to, False, None, str(error)))
        self._run_handlers(ws, msg, reply_on_error=False)

    def _on_late_connect(self, ws: ClientConnection, msg: Message) -> None:
        logger.debug("Extra 'connect' answer from the broker ignored")

    # ------------------------------------------------------------------ requests

    def _on_request(self, ws: ClientConnection, msg: Message) -> None:
        if self._stop_requested.is_set():
            self._spawn(self._answer(ws, msg.msg_id, False, None, SHUTTING_DOWN))
            return
        try:
            body = RequestBody.from_message(msg)
        except ProtocolError as exc:
            logger.warning("Bad request %s from the broker: %s", msg.msg_id, exc)
            self._spawn(self._answer(ws, msg.msg_id, False, None, str(exc)))
            return
        self._in_flight += 1
        self._spawn(self._serve_request(ws, msg.msg_id, body))

    async def _serve_request(self, ws: ClientConnection, request_id: str,
                             body: RequestBody) -> None:
        """Run one command in its own task and answer it, whatever happens."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self._slots:
                ok, data, error = await run_safely(self.registry, body.action, body.params)
        except asyncio.CancelledError:
            await self._answer(ws, request_id, False, None, STOPPED)
            raise
        finally:
            self._in_flight -= 1
        logger.debug("%s %s in %.1f ms%s", body.action, "done" if ok else "failed",
                     (loop.time() - started) * 1000, "" if ok else f": {error}")
        await self._answer(ws, request_id, ok, data, error)

    async def _answer(self, ws: ClientConnection, request_id: str, ok: bool, data: Any,
                      error: str | None) -> None:
        """Send a ``response``; a result that is not JSON becomes an error answer."""
        try:
            text = Message.response(request_id, ok, data, error).to_json()
        except (TypeError, ValueError) as exc:
            text = Message.response(request_id, False, None,
                                    f"Result is not JSON serializable: {exc}").to_json()
        await self._send(ws, text)

    async def _ask(self, ws: ClientConnection, msg: Message) -> ResponseBody:
        """Send a request of ours and wait for the broker's ``response`` to it."""
        future: asyncio.Future[ResponseBody] = asyncio.get_running_loop().create_future()
        self._pending[msg.msg_id] = future
        try:
            if not await self._send(ws, msg.to_json()):
                raise ConnectionLost("Connection to the broker lost")
            return await future
        finally:
            self._pending.pop(msg.msg_id, None)

    def _require_ws(self) -> ClientConnection:
        if self._ws is None:
            raise ConnectionLost("Not connected to a broker")
        return self._ws

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self, ws: ClientConnection) -> str:
        """Tell the broker we are alive and how busy; the broker acks each beat."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            ping = Message.heartbeat(in_flight=self._in_flight)
            self._last_ping = (ping.msg_id, loop.time())
            if not await self._send(ws, ping.to_json()):
                return "heartbeat could not be sent"

    # ------------------------------------------------------------------ custom handlers

    def _run_handlers(self, ws: ClientConnection, msg: Message, *, reply_on_error: bool) -> None:
        for func in self._handlers.get(msg.type, ()):
            self._spawn(self._call_handler(ws, func, msg, reply_on_error))

    async def _call_handler(self, ws: ClientConnection, func: MessageHandler, msg: Message,
                            reply_on_error: bool) -> None:
        try:
            if inspect.iscoroutinefunction(func):
                result = await func(msg)
            else:
                result = await asyncio.to_thread(func, msg)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            logger.exception("Handler %s for '%s' frames failed",
                             getattr(func, "__name__", func), msg.type)
            if reply_on_error:
                await self._send(ws, Message.error(f"Handler for '{msg.type}' failed: "
                                                   f"{describe(exc)}", reply_to=msg.msg_id
                                                   ).to_json())
            return
        if isinstance(result, Message):
            await self._send(ws, result.to_json())

    # ------------------------------------------------------------------ plumbing

    async def _send(self, ws: ClientConnection, text: str) -> bool:
        """Send one frame; False (and a log line) if the connection is gone."""
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            logger.warning("Frame not sent, connection closed: %s", describe(exc))
            return False
        return True

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Worker task failed", exc_info=task.exception())

    async def _finish_tasks(self, timeout: float) -> None:
        """Let running tasks end within ``timeout``; cancel the rest (they answer with errors)."""
        tasks = set(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        if late:
            logger.warning("%d task(s) still running after %.1fs; cancelling", len(late),
                           timeout)
            for task in late:
                task.cancel()
            await asyncio.wait(late, timeout=CLOSE_TIMEOUT)


def _default_registry() -> CommandRegistry:
    """The shared registry, with the built-in commands loaded into it."""
    from . import builtin  # noqa: F401  (registers the built-ins)
    from .handlers import registry

    return registry
