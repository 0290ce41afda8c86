"""Requests read back from the job store after a restart, until their workers report.

No I/O, like the request table it works on. A request that was queued is queued
again. One that was running stays placed on its worker, which keeps running it while
the broker is away (:class:`~workers.protocol.Feature` ``resume``): when the worker
registers again and reports it, it is adopted there (nothing is sent again, nothing
runs twice); a worker that registers without it, or does not come back within
``ADOPT_GRACE``, has lost it, and the request is sent elsewhere or, if its command
must not run twice, answered ``worker_lost``.
"""

from __future__ import annotations

from .. import conf
from ..registry import WorkerEntry
from .requests import Action, Arm, AwaitWorker, Placement, Request, RequestTable, Reserve, State


class Recovery:
    """The table's transitions for requests that lived through a restart."""

    def __init__(self, table: RequestTable) -> None:
        self.table = table
        self._by_worker: dict[str, list[Request]] = {}  # running on it when restored

    def restore(self, request: Request, running_on: str | None, now: float,
                retry_safe: bool = True) -> list[Action]:
        """Hold ``request`` again: queued, or (``running_on``) placed on that worker
        until it reports it (:meth:`adopt`) or its grace runs out (:meth:`not_back`).
        Until then, a worker for it may still be on its way back: it waits for one."""
        request.patient_until = now + conf.get("ADOPT_GRACE")
        self.table.add(request)
        self.table.stats["restored"] += 1
        if running_on is None:
            return [Arm(request), Reserve([request])]
        request.state, request.retry_safe = State.PLACED, retry_safe
        request.placements.append(Placement(running_on, "", ""))
        request.tried.append(running_on)
        self._by_worker.setdefault(running_on, []).append(request)
        return [Arm(request), AwaitWorker(request, conf.get("ADOPT_GRACE"))]

    def awaited(self, worker_id: str) -> list[Request]:
        """The requests that wait for this worker to come back and report them (asked
        once, when it registers: it adopts them or has lost them)."""
        return [r for r in self._by_worker.pop(worker_id, ()) if r.state is State.PLACED
                and any(p.awaited and p.worker_id == worker_id for p in r.placements)]

    def adopt(self, request: Request, worker: WorkerEntry) -> None:
        """Its worker came back, still running it: placed there, not sent again."""
        request.placements = [Placement(worker.worker_id, worker.connection, worker.inbox)]
        self.table.stats["adopted"] += 1

    def not_back(self, key: str) -> list[Action]:
        """Its worker did not report it in time (or came back without it): lost."""
        request = self.table.requests.get(key)
        if request is None or not any(p.awaited for p in request.placements):
            return []
        self.table.stats["not_back"] += 1
        return self.table.lost(key, request.placements[0].worker_id,
                               "its worker did not come back with it after the broker "
                               "restarted")
