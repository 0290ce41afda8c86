"""The fleet from Django code: ``call``, ``acall``, ``start`` and ``astart``.

The same semantics and typed errors as the requester client (:mod:`workers.requester`):
``call`` returns the answer's data or raises the :class:`~workers.errors.RequestFailed`
subclass of its code (``NoWorkers``, ``Timeout``, ``CommandFailed``...); ``start``
returns once the job is stored (no broker restart or crash loses it from then on) with
a :class:`FleetJob` to wait for, cancel or forget.

Where it goes: in a broker process (a dispatcher runs on this process's event loop) a
request goes straight to the dispatcher; anywhere else (a web process, a shell, a
``fleetworker``) through one WebSocket connection per process to the broker's
requester socket, ``settings.DISPATCH_FLEET = {"URL": "ws://broker:8766/", "KEY":
"<requester key>"}`` (defaults: this machine's requester port, ``$BROKER_TOKEN``).
Sync functions may be called from any thread but the broker's own event loop; use the
async ones there.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar

from workers import protocol
from workers.address import broker_url
from workers.errors import RequestFailed
from workers.protocol import ApiResponse, ErrorCode
from workers.requester import Job, Progress, Requester, Result, Route, unix_seconds

from . import conf
from .balancing import selector
from .control import services
from .control.services import Reply
from .core.requests import over_limits

T = TypeVar("T")

#: Who in-process requests belong to (as the control API's): what ``attach`` and the
#: admin see.
OWNER = "operator"

_lock = threading.Lock()
_remote: _Remote | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """What a request may say beside its command and data (see :meth:`Requester.start`)."""

    timeout: float | None = None
    priority: int = 0
    select: dict[str, str] | None = None
    affinity: str | None = None
    not_before: float | datetime | None = None
    wait_for_workers: bool = False
    keep: float | None = None
    task: str | None = None
    request_id: str | None = None
    replay_of: str = ""  # in a broker process only: the admin's "run again"
    stored: bool = True  # start() returns once it is stored; call() waits for its answer


class FleetJob:
    """A started job: its ``request_id``, its result (sync or async), its cancel."""

    def __init__(self, request_id: str, answer: Awaitable[Any],
                 cancel: Callable[[], Awaitable[None]]) -> None:
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()  # made where its request went
        self._wait = asyncio.ensure_future(answer)  # awaited any number of times
        self._wait.add_done_callback(_retrieved)  # a job nobody waits for is no error
        self._cancel = cancel

    async def aresult(self) -> Any:
        """Its answer's data; a failure raises the RequestFailed subclass of its code."""
        return await _on(self._loop, self._wait)

    def result(self, timeout: float | None = None) -> Any:
        return _blocking(self._loop, self._wait, timeout)

    async def acancel(self) -> None:
        """Ask the broker to stop it (its answer then says ``cancelled``)."""
        await _on(self._loop, self._cancel())

    def cancel(self) -> None:
        _blocking(self._loop, self._cancel(), None)


def call(command: str, data: dict[str, Any] | None = None, **options: Any) -> Any:
    """Run ``command`` on the best worker and return its answer's data (blocking)."""
    return start(command, data, stored=False, **options).result()


async def acall(command: str, data: dict[str, Any] | None = None, **options: Any) -> Any:
    """:func:`call` for async code."""
    return await (await astart(command, data, stored=False, **options)).aresult()


def start(command: str, data: dict[str, Any] | None = None, **options: Any) -> FleetJob:
    """Start a job and return once it is stored; see :class:`Options` for ``options``."""
    loop, coro = _starter(command, data or {}, Options(**options))
    return _blocking(loop, coro, None)


async def astart(command: str, data: dict[str, Any] | None = None, **options: Any
                 ) -> FleetJob:
    """:func:`start` for async code."""
    loop, coro = _starter(command, data or {}, Options(**options))
    return await _on(loop, coro)


def cancel(request_id: str) -> None:
    """Cancel a job (answered ``cancelled``; its worker told to stop). In a broker
    process, anyone's; elsewhere, one of this process's key."""
    loop, coro = _canceller(request_id)
    _blocking(loop, coro, None)


async def acancel(request_id: str) -> None:
    """:func:`cancel` for async code."""
    loop, coro = _canceller(request_id)
    await _on(loop, coro)


async def awatch(request_id: str, timeout: float | None = None
                 ) -> AsyncIterator[dict[str, Any]]:
    """A job's progress as it comes, then its result, as dicts ready to send to a
    browser: ``{"event": "progress", "progress": 0.5, "message": "..."}``, ...,
    ``{"event": "result", "success": true, "data": ..., "error": null, "code": null}``.
    In a broker process: jobs started there; elsewhere: jobs of this process's key."""
    caller = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def push(item: dict[str, Any]) -> None:
        caller.call_soon_threadsafe(queue.put_nowait, item)

    loop = broker_loop()
    if loop is not None:
        producer = _watch_here(request_id, push)
    else:
        remote = _remote_fleet()
        loop, producer = remote.loop, remote.watch(request_id, timeout, push)
    running = asyncio.run_coroutine_threadsafe(producer, loop)
    try:
        while True:
            item = await queue.get()
            yield item
            if item["event"] == "result":
                return
    finally:
        running.cancel()


async def _data(answer: Awaitable[ApiResponse]) -> Any:
    response = await answer
    if not response.success:
        raise RequestFailed.from_answer(response.error, response.code, response)
    return response.data


def _result(response: ApiResponse | None, exc: BaseException | None = None
            ) -> dict[str, Any]:
    if response is None:
        return {"event": "result", "success": False, "data": None,
                "error": f"{type(exc).__name__}: {exc}", "code": getattr(exc, "code", None)}
    return {"event": "result", "success": response.success, "data": response.data,
            "error": response.error, "code": response.code}


async def _watch_here(request_id: str, push: Callable[[dict[str, Any]], None]) -> None:
    from .core.dispatcher import get_dispatcher

    class Watch(_Answer):
        async def answer(self, response: ApiResponse, text: str) -> None:
            push(_result(response))

        async def event(self, request_id: str, text: str, *, ack: Any = None,
                        mergeable: bool = False) -> None:
            push(protocol.loads_object(text))
            await super().event(request_id, text, ack=ack)

    dispatcher = await get_dispatcher()
    if not await dispatcher.lookup.attach(OWNER, request_id, Watch(), True):
        push(_result(ApiResponse.failure(request_id, f"Unknown request '{request_id}'",
                                         ErrorCode.UNKNOWN_REQUEST)))


# --------------------------------------------------------------------------- where it goes


def broker_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop this process's dispatcher runs on (None: not a broker process)."""
    from .core.dispatcher import _dispatchers

    for loop, task in list(_dispatchers._started.items()):
        if loop.is_running() and not loop.is_closed() and task.done() and \
                not task.cancelled() and task.exception() is None:
            return loop
    return None


def _starter(command: str, data: dict[str, Any], options: Options
             ) -> tuple[asyncio.AbstractEventLoop, Coroutine[Any, Any, FleetJob]]:
    loop = broker_loop()
    if loop is not None:
        return loop, _start_here(command, data, options)
    if options.replay_of:
        raise RuntimeError("replay runs in a broker process")
    remote = _remote_fleet()
    return remote.loop, remote.start(command, data, options)


def _canceller(request_id: str
               ) -> tuple[asyncio.AbstractEventLoop, Coroutine[Any, Any, None]]:
    loop = broker_loop()
    if loop is not None:
        return loop, _cancel_here(request_id)
    remote = _remote_fleet()
    return remote.loop, remote.cancel(request_id)


async def _cancel_here(request_id: str) -> None:
    await services.cancel(request_id, "Django code")


async def _start_here(command: str, data: dict[str, Any], options: Options) -> FleetJob:
    from .core.dispatcher import get_dispatcher

    dispatcher = await get_dispatcher()
    if options.timeout is not None and not 0 < options.timeout <= conf.get("MAX_TIMEOUT"):
        raise ValueError(f"timeout must be between 0 and {conf.get('MAX_TIMEOUT'):g} s")
    beyond = over_limits(unix_seconds(options.not_before), options.keep)
    if beyond:
        raise ValueError(beyond)
    sink = _Answer()
    request_id = options.request_id or protocol.new_id()
    await dispatcher.submit(
        command, dict(data), sink, request_id=request_id, requester="fleet",
        timeout=options.timeout, owner=OWNER, priority=options.priority,
        select=selector(options.select or {}), affinity=options.affinity,
        not_before=unix_seconds(options.not_before), wait_for_workers=options.wait_for_workers,
        keep=options.keep or 0.0, task=options.task or "", replay_of=options.replay_of)
    if options.stored:  # (even if answered already: its row is there for whoever reads it)
        await dispatcher.keeper.committed()

    return FleetJob(request_id, sink.result(), lambda: _cancel_here(request_id))


class _Answer(Reply):
    """The sink of an in-process request, with its answer's data (or typed error)."""

    async def result(self) -> Any:
        return await _data(self.future)


class _Remote:
    """One connection per process to the broker's requester socket, on a loop of its
    own in a daemon thread (sync callers block on it; async ones await it)."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url, self.key = url, key
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="dispatch.fleet",
                         daemon=True).start()
        self._requester: Requester | None = None
        self._dialling: asyncio.Lock | None = None

    async def connected(self) -> Requester:
        self._dialling = self._dialling or asyncio.Lock()
        async with self._dialling:
            if self._requester is None:
                self._requester = await Requester(self.url, token=self.key).connect()
            return self._requester

    async def cancel(self, request_id: str) -> None:
        await (await self.connected())._send_cancel(request_id)

    async def watch(self, request_id: str, timeout: float | None,
                    push: Callable[[dict[str, Any]], None]) -> None:
        job = await (await self.connected()).watch(request_id, timeout=timeout)
        try:
            async for event in job.events():
                if isinstance(event, Result):
                    push(_result(event.response))
                elif isinstance(event, Progress):
                    push({"event": "progress", "progress": event.progress,
                          "message": event.message})
        except RequestFailed as exc:
            push(_result(exc.response if isinstance(exc.response, ApiResponse) else None,
                         exc))
        except (TimeoutError, ConnectionError) as exc:
            push(_result(None, exc))

    async def start(self, command: str, data: dict[str, Any], options: Options) -> FleetJob:
        requester = await self.connected()
        if not options.stored and not (options.wait_for_workers or options.keep or
                                       options.task):  # a call: its answer is what counts
            request_id = options.request_id or protocol.new_id()
            answer = requester.request(
                command, data, timeout=options.timeout, priority=options.priority,
                route=Route(select=options.select, affinity=options.affinity),
                not_before=options.not_before, request_id=request_id)
            return FleetJob(request_id, _data(answer),
                            lambda: requester._send_cancel(request_id))
        job: Job = await requester.start(
            command, data, timeout=options.timeout, priority=options.priority,
            route=Route(select=options.select, affinity=options.affinity),
            not_before=options.not_before, wait_for_workers=options.wait_for_workers,
            keep=options.keep, request_id=options.request_id, task=options.task)
        return FleetJob(job.request_id, job.result(), job.cancel)

    async def close(self) -> None:
        if self._requester is not None:
            await self._requester.close()
            self._requester = None


def settings_of() -> tuple[str, str | None]:
    """The broker's requester URL and key for processes that are not brokers."""
    from django.conf import settings

    given = getattr(settings, "DISPATCH_FLEET", {}) or {}
    url = given.get("URL") or broker_url("127.0.0.1", conf.get("REQUESTER_PORT"))
    return url, given.get("KEY") or os.environ.get("BROKER_TOKEN") or None


def owner_here() -> str:
    """Whose jobs this process starts, as the job store names owners: the operator's in
    a broker process, else its key's credential's ("anonymous" without a key)."""
    if broker_loop() is not None:
        return OWNER
    _, key = settings_of()
    return _owner_of(key or "")


@functools.lru_cache(maxsize=8)
def _owner_of(key: str) -> str:
    """The owner a key's jobs have (looked up once per key: get_result is polled)."""
    parts = key.split("_")
    if len(parts) < 3:
        return "anonymous"
    from .auth import digest
    from .models import Credential

    found = Credential.objects.filter(key_id=parts[1]).values_list("pk", "digest").first()
    return f"credential:{found[0]}" if found and found[1] == digest(key) else "anonymous"


def _remote_fleet() -> _Remote:
    global _remote
    with _lock:
        url, key = settings_of()
        if _remote is None or (_remote.url, _remote.key) != (url, key):
            _remote = _Remote(url, key)  # (settings changed: a test; the old one idles)
        return _remote


# --------------------------------------------------------------------------- crossing loops


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _on(loop: asyncio.AbstractEventLoop, work: Awaitable[T]) -> T:
    """Await ``work`` (a coroutine or future of ``loop``) from whatever loop runs now."""
    if asyncio.get_running_loop() is loop:
        return await work
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(work), loop))


def _blocking(loop: asyncio.AbstractEventLoop, work: Awaitable[T],
              timeout: float | None) -> T:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        if asyncio.iscoroutine(work):
            work.close()
        raise RuntimeError("a blocking fleet call on the broker's event loop would stop "
                           "it: use acall/astart/aresult in async code")
    return asyncio.run_coroutine_threadsafe(_awaited(work), loop).result(timeout)


async def _awaited(work: Awaitable[T]) -> T:
    return await work

