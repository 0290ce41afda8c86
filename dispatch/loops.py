"""One service object per event loop, started on first use.

The dispatcher and the credential guard each run background tasks, so each
belongs to one event loop: daphne's in production, a fresh one per test.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Generic, Protocol, TypeVar


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

