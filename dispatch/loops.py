"""Event-loop helpers: one service object per loop, and batches of work.

The dispatcher and the credential guard each run background tasks, so each
belongs to one event loop: daphne's in production, a fresh one per test.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Generic, Protocol, TypeVar

log = logging.getLogger("dispatch.loops")


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)


class PerLoop(Generic[S]):
    """Holds the service of each running loop; concurrent first calls share one start."""

    def __init__(self, factory: Callable[[], S]) -> None:
        self._factory = factory
        self._started: dict[asyncio.AbstractEventLoop, asyncio.Task[S]] = {}

    async def get(self) -> S:
        loop = asyncio.get_running_loop()
        task = self._started.get(loop)
        if task is None:
            task = self._started[loop] = loop.create_task(self._start())
        return await task

    async def _start(self) -> S:
        service = self._factory()
        await service.start()
        return service

    async def stop(self) -> None:
        """Stop this loop's service, if it was started (shutdown, tests)."""
        task = self._started.pop(asyncio.get_running_loop(), None)
        if task is not None:
            await (await task).stop()



T = TypeVar("T")


class Batcher(Generic[T]):
    """Items added while the previous batch was being handled are handled as one.

    For work that costs a round trip whatever its size (a Redis script, a layer send):
    at low load each item goes alone, at once (the next tick); under load the batches
    grow by themselves, up to what arrived during one round trip. ``handle`` must
    answer for every item itself: an exception is logged, the items are not retried.
    """

    def __init__(self, handle: Callable[[list[T]], Awaitable[None]], name: str) -> None:
        self._handle = handle
        self._name = name
        self._items: list[T] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, item: T) -> None:
        self._items.append(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        try:
            while self._items:
                items, self._items = self._items, []
                try:
                    await self._handle(items)
                except Exception:
                    log.exception("%s failed on a batch of %d", self._name, len(items))
        finally:
            self._task = None
