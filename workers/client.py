"""The worker runtime: dial out to the broker, register, stay alive, run commands.

A :class:`Worker` is the reconnecting runner: it keeps one WebSocket connection to
the broker at a time, rotating through the broker URLs it was given, with
exponential backoff and jitter between attempts. Each connection is one
:class:`~workers.session.Session` (registration, the reader that starts one task
per ``request``, heartbeats), made for it and dropped with it; the worker keeps
what outlives a connection: its id, its commands, its handlers, the tasks still
running, and the stop.

Only ``websockets`` is needed: this package must never import Django or the broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from websockets.asyncio.client import connect
from websockets.client import process_exception
from websockets.exceptions import ConnectionClosed, InvalidURI
from websockets.uri import parse_uri

from .errors import ConnectionLost, RegistrationFailed, RequestFailed, describe
from .handlers import CommandRegistry
from .protocol import (MAX_JOBS, CloseCode, ErrorCode, Feature, Message, MessageType,
                       Registration, quote, random_id)
from .address import auth_headers
from .relay import Relay
from .runner import STOPPED, Runner
from .session import CLOSE_TIMEOUT, SHUTTING_DOWN, MessageHandler, Session

logger = logging.getLogger("workers.client")

#: Used until the broker states its own interval in its answer to ``connect``.
DEFAULT_HEARTBEAT_INTERVAL = 5.0
OPEN_TIMEOUT = 10.0
#: We accept big frames; the broker enforces its own limit (1 MiB by default).
MAX_FRAME_BYTES = 16 * 2**20

#: Frame types the worker handles itself; :meth:`Worker.on` refuses them.
RESERVED_TYPES = frozenset({MessageType.CONNECT.value, MessageType.DISCONNECT.value,
                            MessageType.HEARTBEAT.value, MessageType.REQUEST.value,
                            MessageType.RESPONSE.value})

__all__ = ["RegistrationFailed", "SHUTTING_DOWN", "STOPPED", "Worker", "backoff", "check_url",
           "default_name"]


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
                 stop_timeout: float = 30.0, token: str | None = None,
                 labels: dict[str, str] | None = None, version: str = "") -> None:
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
        #: What requests may select this worker by (``{"gpu": "a100"}``), and its
        #: version (for canary routing); both sent when it registers.
        self.labels = dict(labels or {})
        self.version = version
        #: Set while registered with a broker; cleared when the connection ends.
        self.connected = asyncio.Event()

        self._worker_id = random_id()
        self._interval = heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL
        self._retry_after: float | None = None  # what the last broker to leave asked
        self._describe = True  # send the commands' schemas (until a broker finds them too big)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._handlers: dict[str, list[MessageHandler]] = {}
        self._session: Session | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The jobs and what they send: they outlive a connection (Feature.RESUME).
        self._relay = Relay()
        self._runner = Runner(self.registry, self._slots, self._spawn, self._relay)
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
        return self._runner.in_flight

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task of the worker's: stop() waits for it (a job runs in one)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Worker task failed", exc_info=task.exception())

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
        Returns the answer's data; raises :class:`RequestFailed` (a subclass by its
        code) for a failure answer, :class:`ConnectionLost` if the connection drops
        first, and :class:`TimeoutError` when ``timeout`` runs out.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
                if self._session is None:
                    raise ConnectionLost("Not connected to a broker")
                body = await self._session.ask(Message.request(action, params))
        except TimeoutError:
            raise TimeoutError(f"No answer to '{action}' within {timeout}s") from None
        if not body.success:
            raise RequestFailed.from_answer(body.error, body.code, body)
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
                if self._retry_after is not None:  # the broker said when: then, not before
                    delay, self._retry_after = self._retry_after, None
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
        session = asyncio.create_task(self._connection(url))
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

    async def _connection(self, url: str) -> tuple[bool, str]:
        """One connection from dial to close; returns (registered?, why it ended)."""
        registered = False
        try:
            async with connect(url, max_size=MAX_FRAME_BYTES, open_timeout=OPEN_TIMEOUT,
                               close_timeout=CLOSE_TIMEOUT, ping_interval=None,
                               additional_headers=auth_headers(self.token)) as ws:
                session = Session(ws, self._runner, self._handlers, self._spawn,
                                  self._stop_requested.is_set, self._interval)
                self._relay.attach(session.outbox)
                answer = await session.register(self._registration())
                self._adopt(answer)
                await self._resume(session, answer)
                session.interval = self._interval
                registered = True
                self._session = session
                self.connected.set()
                try:
                    return True, await session.serve(
                        self._stop_requested, lambda: self._finish_tasks(self._stop_deadline))
                finally:
                    self.connected.clear()
                    self._session = None
                    self._retry_after = session.retry_after
                    self._relay.detach()
        except RegistrationFailed as exc:
            logger.error("Registration of worker %s with %s failed: %s", self._worker_id, url,
                         exc)
            if exc.code == ErrorCode.TOO_LARGE.value and self._describe:
                # A broker with a small MAX_MESSAGE_BYTES: its limit is on every frame,
                # and the commands' descriptions are what can be done without.
                self._describe = False
                logger.warning("Registering without command schemas from now on: the "
                               "broker's frame limit is too small for them")
                return False, "registration too large"
            if exc.close_code == CloseCode.WORKER_ID_TAKEN:
                old, self._worker_id = self._worker_id, random_id()
                logger.warning("Worker id %s belongs to another credential; registering as "
                               "%s from now on", old, self._worker_id)
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

    def _registration(self) -> Registration:
        held = [*self._runner.jobs, *(k for k in self._relay.held_ids()
                                      if k not in self._runner.jobs)]
        return Registration(self._worker_id, self.name, self.registry.names(), self.weight,
                            self.max_concurrency, self.registry.not_idempotent(),
                            self.registry.leases(), self.labels, self.version,
                            self.registry.hedged(),
                            self.registry.schemas() if self._describe else {},
                            features=frozenset(Feature), jobs=held[:MAX_JOBS])

    async def _resume(self, session: Session, answer: dict[str, Any]) -> None:
        await self._runner.resume(answer, Feature.RESUME in session.features)

    def _adopt(self, data: dict[str, Any]) -> None:
        """The broker's answer to ``connect``: its id for us, and its heartbeat interval."""
        worker_id, interval = data.get("worker_id"), data.get("heartbeat_interval")
        if isinstance(worker_id, str) and worker_id:
            self._worker_id = worker_id
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            self._interval = float(interval)
        logger.info("Registered as %s (%s), commands: %d; heartbeat every %.1fs",
                    self._worker_id, self.name, len(self.registry.names()), self._interval)
        dropped = data.get("schemas_dropped")
        if isinstance(dropped, list) and dropped:
            logger.warning("The broker did not keep some command schemas: %s",
                           quote("; ".join(map(str, dropped)), 1000))

    async def _sleep_unless_stopped(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop_requested.wait(), delay)
        except TimeoutError:
            pass

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
