"""Which broker processes are alive, so that the rows of dead ones go offline.

A broker process killed with ``kill -9`` writes no disconnects: its workers'
registration rows would stay "online" in the admin forever. So every process says
it is alive in the shared registry (a sorted set in Redis, with a deadline), and
every ``ttl`` seconds marks offline the rows of processes that stopped saying so.
A dead process's rows go offline within about three ``ttl`` (20 s each with the
default heartbeat settings). On the embedded default there is one process: rows an
earlier run left online go offline when it starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .. import conf
from ..history import mark_processes_offline
from ..registry import Registry, RegistryUnavailable

log = logging.getLogger("dispatch.liveness")


def liveness_ttl() -> float:
    """Seconds a process's liveness lasts without a renewal."""
    return conf.get("HEARTBEAT_INTERVAL") * (conf.get("HEARTBEAT_MISSES") + 1)


def takeover_seconds() -> float:
    """The most it takes another process to take a dead one's requests over: its
    liveness expires (one ttl), then it is missing from two reaping rounds (one ttl
    apart), and a beat. What waits for a takeover (the jobs a worker goes on with, the
    answers passed to a process that died) is kept at least this long."""
    return 3 * liveness_ttl() + conf.get("HEARTBEAT_INTERVAL")


class Liveness:
    """This process's part: say it is alive, and tidy up after the dead."""

    def __init__(self, registry: Registry, process: str,
                 reap: Callable[[set[str]], Awaitable[None]] | None = None) -> None:
        self.registry = registry
        self.process = process
        #: Called each round with the live processes: takes over what the dead held.
        self.reap = reap
        self._task: asyncio.Task[None] | None = None
        self._reaping: asyncio.Task[None] | None = None

    @property
    def ttl(self) -> float:
        return liveness_ttl()

    async def start(self) -> None:
        if self.registry.local:  # the only process: whatever else is online is stale
            await mark_processes_offline(keep=[self.process])
            return
        try:
            await self.registry.process_alive(self.process, self.ttl)
        except RegistryUnavailable as exc:
            log.warning("could not say this process is alive: %s", exc)
        self._task = asyncio.create_task(self._run(), name="dispatch-liveness")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        if self._reaping is not None:
            self._reaping.cancel()
        try:
            await self.registry.process_gone(self.process)
        except RegistryUnavailable as exc:  # its deadline passes by itself
            log.warning("could not say this process is leaving: %s", exc)

    async def _run(self) -> None:
        interval = conf.get("HEARTBEAT_INTERVAL")
        every = max(1, round(self.ttl / interval))  # reap every ttl: a database update
        beats = 0
        while True:
            await asyncio.sleep(interval)
            beats += 1
            try:
                await self.registry.process_alive(self.process, self.ttl)
                if beats % every == 0 and (self._reaping is None or self._reaping.done()):
                    # Apart: however long tidying up takes, the next beat is on time (a
                    # late one would let the others take this live process for dead).
                    self._reaping = asyncio.create_task(self._tidy(), name="dispatch-reap")
            except RegistryUnavailable as exc:
                log.warning("process liveness: %s", exc)

    async def _tidy(self) -> None:
        try:
            live = await self.registry.live_processes()
            # A process that started a moment ago may not be listed yet: its rows are
            # younger than two ttl, and left alone.
            await mark_processes_offline(keep=live | {self.process}, older_than=2 * self.ttl)
            if self.reap is not None:
                await self.reap(live)
        except RegistryUnavailable as exc:
            log.warning("process liveness: %s", exc)
        except Exception:  # a defect, or the database away: said; the next round tries
            log.exception("tidying up after stopped broker processes failed")
