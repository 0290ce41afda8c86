"""What the dispatcher tells the job store, and what it reads back at start.

The dispatcher calls :meth:`Keeper.accepted`, :meth:`~Keeper.placed` and
:meth:`~Keeper.answered` as a request goes (none awaits: the store commits in the
background); at start, :meth:`Keeper.start` serves again what an earlier run left
unanswered, and puts the answers it kept where a returning requester looks for
them. With ``JOB_STORE`` off, all of this does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .. import conf
from ..registry import WorkerEntry
from .events import Forward
from .recovery import Recovery
from .requests import Action, Request, RequestTable
from .results import Results
from .store import JobStore, Kept

log = logging.getLogger("dispatch.keeper")

Perform = Callable[[list[Action]], Awaitable[None]]


class Keeper:
    """The job store's side of one process's dispatcher."""

    def __init__(self, table: RequestTable, results: Results, perform: Perform,
                 process: str) -> None:
        self.store = JobStore(process) if conf.get("JOB_STORE") else None
        self.recovery = Recovery(table)
        self.results = results
        self._perform = perform
        #: Event-loop time until which a request that finds no worker waits for one: a
        #: fleet is coming back after a restart (0: none is expected).
        self.patient_until = 0.0

    def accepted(self, request: Request) -> None:
        if self.store is not None:
            self.store.accepted(request)

    def placed(self, request: Request, worker_id: str) -> None:
        if self.store is not None:
            self.store.placed(request, worker_id)

    def answered(self, request: Request, text: str, when: float) -> None:
        if self.store is not None:
            self.store.answered(request, text, when)

    def committed(self) -> asyncio.Future[None]:
        """Done once what was accepted so far cannot be lost (at once without a store)."""
        if self.store is not None:
            return self.store.committed()
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def start(self, dead: list[str] | None) -> None:
        """Serve again what the ``dead`` processes (None: any earlier run) left."""
        if self.store is None:
            return
        await self.store.start()
        if dead is None:  # the only process: its kept answers were in its memory
            for owner, request_id, answer in await self.store.answered_lately():
                self.results.put(owner, request_id, answer)  # a requester may come back
        kept = await self.store.take_over(dead)
        if kept:
            log.warning("job store: %d request(s) left unanswered by a stopped broker "
                        "process: served again (%d were running)", len(kept),
                        sum(k.state == "running" for k in kept))
        now = asyncio.get_running_loop().time()
        if kept or await self.store.had_workers_lately(conf.get("ADOPT_GRACE")):
            self.patient_until = now + conf.get("ADOPT_GRACE")
        for row in kept:
            await self._perform(self.recovery.restore(
                request_from(row), row.worker_id if row.state == "running" else None, now,
                row.retry_safe))

    async def adopt(self, entry: WorkerEntry, reported: list[str], inbox: str
                    ) -> list[Forward]:
        """A worker registers: of the requests that were running on it when the broker
        restarted, those it reports (it went on with them) are placed on it again, as
        the forwards it would have had; those it does not report, it has lost."""
        held, lost = set(reported), []
        forwards = []
        now = asyncio.get_running_loop().time()
        for request in self.recovery.awaited(entry.worker_id):
            if request.key not in held:
                lost.append(request.key)
                continue
            self.recovery.adopt(request, entry)
            forwards.append(Forward(request.key, request.command, request.data, inbox,
                                    max(0.001, request.deadline - now), entry.worker_id,
                                    entry.connection, request.stream, request.traceparent))
        for key in lost:
            await self._perform(self.recovery.not_back(key))
        if forwards or lost:
            log.info("worker %s came back with %d job(s) of before the restart; %d it no "
                     "longer had", entry.worker_id, len(forwards), len(lost))
        return forwards

    async def stop(self) -> None:
        if self.store is not None:
            await self.store.stop()

    async def kept_answer(self, owner: str, request_id: str) -> str | None:
        """The answer kept for a request (memory or Redis first, then the store)."""
        text = await self.results.get(owner, request_id)
        if text is None and self.store is not None:
            text = await self.store.kept(owner, request_id)
        return text


def request_from(row: Kept) -> Request:
    """A request as it was accepted, from its row; nobody watches it until someone
    attaches (its answer is kept for them)."""
    now, loop_now = time.time(), asyncio.get_running_loop().time()
    body = row.request
    return Request(
        row.key, row.command, body.get("data") or {}, [], row.request_id,
        str(body.get("requester") or ""), loop_now + (row.deadline - now), row.created_at,
        loop_now - (now - row.created_at), traceparent=str(body.get("traceparent") or ""),
        target=body.get("target"), owner=row.owner, priority=int(body.get("priority") or 0),
        select=tuple(tuple(p) for p in body.get("select") or ()),  # type: ignore[misc]
        affinity=body.get("affinity"), hedge=bool(body.get("hedge")))

