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
from .events import Departure
from .requests import Action, Arm, AwaitWorker, Placement, Request, RequestTable, State


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
        request.patient_until = max(request.patient_until, now + conf.get("ADOPT_GRACE"))
        self.table.add(request)
        self.table.stats["restored"] += 1
        if running_on is None:
            return [Arm(request), *self.table.serve(request, now)]
        request.state, request.retry_safe = State.PLACED, retry_safe
        request.lost_because = "its worker did not come back with it after the broker " \
                               "restarted"
        request.placements.append(Placement(running_on, "", ""))
        request.tried.append(running_on)
        self._by_worker.setdefault(running_on, []).append(request)
        return [Arm(request), AwaitWorker(request, conf.get("ADOPT_GRACE"))]

    def awaited(self, worker_id: str) -> list[Request]:
        """The requests that wait for this worker to come back and report them."""
        waiting = [r for r in self._by_worker.get(worker_id, ()) if is_awaited(r, worker_id)]
        if waiting:
            self._by_worker[worker_id] = waiting
        else:
            self._by_worker.pop(worker_id, None)
        return waiting

    def reported(self, worker_id: str, connection: str, keys: set[str]) -> list[Request]:
        """Requests placed on this worker by an earlier connection of its, which it
        reports running (its broker process died, or its link dropped): adoptable too."""
        return [r for key in keys if (r := self.table.requests.get(key)) is not None
                and r.state is State.PLACED and any(
                    p.worker_id == worker_id and p.connection not in ("", connection)
                    for p in r.placements)]

    def adopt(self, request: Request, worker_id: str, connection: str, inbox: str) -> None:
        """Its worker came back, still running it: placed there, not sent again."""
        request.placements = [p for p in request.placements if p.worker_id != worker_id]
        request.placements.insert(0, Placement(worker_id, connection, inbox))
        self.table.stats["adopted"] += 1

    def waiting_for(self, key: str, worker_id: str) -> Request | None:
        """The request ``key`` if it still waits for that worker to report it."""
        request = self.table.requests.get(key)
        return request if request is not None and is_awaited(request, worker_id) else None

    def away(self, key: str, worker_id: str, departure: Departure) -> list[Action] | None:
        """Its worker's connection ended, and the worker keeps its jobs. Sent away by a
        leaving broker process, it comes back elsewhere: the request waits for it
        (ADOPT_GRACE). Dropped, it may be dead: a request that must not run twice waits
        two heartbeat intervals (sending it elsewhere is no option, and answering
        worker_lost at once would be a guess: a network blip is over by then); None for
        any other request (it goes elsewhere at once)."""
        request = self.table.requests.get(key)
        sent_away = departure is Departure.SENT_AWAY
        if request is None or (request.retry_safe and not sent_away) or \
                request.state is not State.PLACED or \
                [p.worker_id for p in request.placements] != [worker_id]:
            return None
        request.placements = [Placement(worker_id, "", "")]
        request.lost_because = ("its broker process left, and it did not come back with it"
                                if sent_away else
                                "its connection dropped, and it did not come back with it")
        self._by_worker.setdefault(worker_id, []).append(request)
        self.table.stats["awaited"] += 1
        return [AwaitWorker(request, conf.get("ADOPT_GRACE") if sent_away
                            else 2 * conf.get("HEARTBEAT_INTERVAL"))]

    def not_back(self, key: str) -> list[Action]:
        """Its worker did not report it in time (or came back without it): lost."""
        request = self.table.requests.get(key)
        if request is None or not any(p.awaited for p in request.placements):
            return []
        self.table.stats["not_back"] += 1
        return self.table.lost(key, request.placements[0].worker_id, request.lost_because)


def is_awaited(request: Request, worker_id: str) -> bool:
    return request.state is State.PLACED and any(
        p.awaited and p.worker_id == worker_id for p in request.placements)
