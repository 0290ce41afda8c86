"""Firing periodic schedules: each due time once in a cluster, and across a crash.

Every broker process runs a :class:`Scheduler`. It looks at the schedules (in a
thread of its own, like the job store) at each due time and at least once a second,
and fires those that are due, each in one database transaction:

1. lock the schedule's row (``SELECT ... FOR UPDATE SKIP LOCKED`` where the database
   has it: a process that finds it locked leaves it to the one that holds it; on
   SQLite, a write first, which takes the database's one writer lock) and read it
   afresh: due still, or another process fired it meanwhile;
2. insert the firing's :class:`~dispatch.models.Job` row (queued, held by this
   process), keyed by the schedule and the due time
   (:func:`~dispatch.schedules.firing_id`): a second insert of the same firing breaks
   the key's uniqueness, and its transaction fails whole;
3. move the schedule's next due time past now (:func:`~dispatch.schedules.step`).

Only then is the request handed to this process's dispatcher, under the row's key. A
process that dies before the commit fired nothing (the schedule is still due, for the
next look of any process); one that dies after it left a queued row, which is taken
over like any other unanswered job (at its next start, or by another process of the
cluster once it is seen dead): the firing is neither lost nor doubled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F, Min, Q

from workers.protocol import ApiResponse

from .. import conf
from ..balancing import selector
from ..loops import PerLoop
from ..models import Job, Schedule
from ..schedules import (OWNER, ScheduleError, Timing, firing_id, step, task_keep,
                         what_it_runs)
from ..dbthread import DbThread
from .dispatcher import Dispatcher, get_dispatcher
from .requests import Request
from .store import QUEUED, payload

log = logging.getLogger("dispatch.scheduler")

UTC = timezone.utc
#: Seconds between two looks at most: a new or changed schedule is seen within this.
TICK = 1.0
#: Seconds between two looks at least (a due schedule another process is firing).
LEAST = 0.02
#: Seconds a look comes after the due time it waits for (asyncio may wake a hair early).
SLACK = 0.002
#: Seconds stop() waits for a look under way (it may be firing) before cancelling it.
STOP_WAIT = 5.0


@dataclass(slots=True)
class Fired:
    """A firing committed: its row is in the job store (if there is one)."""

    schedule: str
    key: str
    command: str
    data: dict[str, Any]
    select: tuple[tuple[str, str], ...]
    timeout: float
    due: datetime
    missed: int
    task: str = ""  # a Django task's module path: its result is kept, it waits for workers
    keep: float = 0.0


class Scheduler:
    """This process's firing of due schedules."""

    def __init__(self) -> None:
        self.process = conf.process_name()
        self._thread = DbThread("schedules")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._broken: dict[int, str] = {}  # schedule id -> why it cannot fire (said once)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatch-schedules")

    async def stop(self) -> None:
        """Stop looking; a look under way finishes first (what it fired is handed to the
        dispatcher, or stays in the job store for whoever takes this process's rows)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            done, _ = await asyncio.wait([task], timeout=STOP_WAIT)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._thread.close()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                delay = await self.look()
            except Exception as exc:  # noqa: BLE001 - the database away: said, tried again
                log.warning("schedules: could not look at them, trying again in %.0f s: %s",
                            TICK, exc, exc_info=not isinstance(exc, DatabaseError))
                delay = TICK
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def look(self) -> float:
        """Fire what is due now; the seconds until the next look."""
        due, earliest = await self._thread.run(_look, datetime.now(UTC))
        if due:
            dispatcher = await get_dispatcher()
            if self._stopping or not dispatcher.table.accepting:
                return TICK
            fired, broken, earliest = await self._thread.run(
                _fire_all, due, self.process, dispatcher.inbox,
                dispatcher.keeper.store is not None)
            self._say_broken(broken)
            for one in fired:
                await self._hand_over(dispatcher, one)
        if earliest is None:
            return TICK
        wait = (earliest - datetime.now(UTC)).total_seconds() + SLACK
        return min(TICK, max(LEAST, wait))

    async def _hand_over(self, dispatcher: Dispatcher, fired: Fired) -> None:
        """Give a committed firing to the dispatcher, as the request its row is. A
        dispatcher that stopped taking requests leaves the row to whoever takes this
        process's requests over."""
        now = time.time()
        late = now - fired.due.timestamp()
        if fired.missed > 1:
            log.warning("schedule %s: fired once for %d missed due times, the first %s "
                        "(%.1f s ago)", fired.schedule, fired.missed,
                        fired.due.isoformat(), late)
        else:
            log.info("schedule %s: fired %s for %s (%.3f s after its due time)",
                     fired.schedule, fired.command, fired.due.isoformat(), late)
        if not dispatcher.table.accepting:
            log.warning("schedule %s: its firing %s waits in the job store for the process "
                        "that takes this one's requests over", fired.schedule, fired.key)
            return
        await dispatcher.submit(fired.command, fired.data, _Nobody(), request_id=fired.key,
                                requester=f"schedule {fired.schedule}"[:100],
                                timeout=fired.timeout, key=fired.key, owner=OWNER,
                                select=fired.select, task=fired.task, keep=fired.keep,
                                wait_for_workers=bool(fired.task))

    def _say_broken(self, broken: dict[int, str]) -> None:
        for pk, why in broken.items():
            if self._broken.get(pk) != why:
                log.error("schedule %d cannot fire: %s", pk, why)
        self._broken.update(broken)


class _Nobody:
    """The sink of a fired request: nobody waits for it (its answer is kept, and in
    the history)."""

    async def answer(self, response: ApiResponse, text: str) -> None:
        pass

    async def event(self, request_id: str, text: str, *, ack: Any = None,
                    mergeable: bool = False) -> None:
        if ack is not None:
            await ack()


# --------------------------------------------------------------------------- in the thread


def _look(now: datetime) -> tuple[list[int], datetime | None]:
    """The schedules to act on now (due; enabled without a due time; disabled with
    one), and the earliest due time of the others."""
    due = list(Schedule.objects.filter(
        Q(enabled=True, next_run_at__lte=now) | Q(enabled=True, next_run_at=None)
        | Q(enabled=False, next_run_at__isnull=False)).order_by("next_run_at")
        .values_list("pk", flat=True))
    return due, _earliest()


def _earliest() -> datetime | None:
    return Schedule.objects.filter(enabled=True).aggregate(at=Min("next_run_at"))["at"]


def _fire_all(due: list[int], process: str, inbox: str, durable: bool
              ) -> tuple[list[Fired], dict[int, str], datetime | None]:
    """Each schedule in a transaction of its own: one that fails holds up no other."""
    fired, broken = [], {}
    for pk in due:
        try:
            one = _fire(pk, process, inbox, durable)
        except IntegrityError:
            _fired_already(pk)
            continue
        except DatabaseError:
            raise  # the database away: the whole look is tried again
        except Exception as exc:  # noqa: BLE001 - a row no check foresaw: it alone waits
            one = f"schedule {pk} cannot fire: {type(exc).__name__}: {exc}"
            _put_off(pk)
        if isinstance(one, str):
            broken[pk] = one
        elif one is not None:
            fired.append(one)
    return fired, broken, _earliest()


def _put_off(pk: int) -> None:
    """A schedule whose row breaks its firing: looked at again in a minute, not at once
    (the others' due times come first meanwhile)."""
    Schedule.objects.filter(pk=pk).update(next_run_at=datetime.now(UTC) + timedelta(minutes=1))


def _fire(pk: int, process: str, inbox: str, durable: bool) -> Fired | str | None:
    """One transaction: the schedule's row locked and read afresh; if it is due, the
    firing's job row inserted and its next due time moved on. A schedule that cannot
    fire: why (its next due time is cleared, or moved on for one that cannot make its
    request)."""
    with transaction.atomic():
        rows = Schedule.objects.filter(pk=pk)
        if connection.features.has_select_for_update_skip_locked:
            schedule = rows.select_for_update(skip_locked=True).first()
        else:  # one writer at a time (SQLite): a write first, then the read is the latest
            rows.update(last_request_id=F("last_request_id"))
            schedule = rows.first()
        if schedule is None:
            return None  # another process holds it (or it is gone)
        now = datetime.now(UTC)
        timing = Timing.of(schedule)
        try:
            timing.check()
        except ScheduleError as exc:
            rows.update(next_run_at=None)  # looked at again each time, said once
            return f"{schedule.name}: {exc}"
        then = step(schedule.enabled, schedule.next_run_at, timing, now)
        if then.fire is None:
            if then.next_run_at != schedule.next_run_at:
                rows.update(next_run_at=then.next_run_at)
            return None
        key = firing_id(pk, then.fire)
        try:
            command, data = what_it_runs(schedule)
        except Exception as exc:  # noqa: BLE001 - not fired; the next due time is waited for
            rows.update(next_run_at=then.next_run_at)
            return f"{exc}; due time {then.fire.isoformat()} skipped"
        timeout = min(schedule.timeout or conf.get("TIMEOUT"), conf.get("MAX_TIMEOUT"))
        select = selector(schedule.select)
        task = schedule.task.strip()[:200] if not schedule.command.strip() else ""
        keep = task_keep(schedule) if task else 0.0
        if durable:
            request = Request(key, command, data, [], key, f"schedule {schedule.name}"[:100],
                              0.0, now.timestamp(), select=select, task=task, keep=keep,
                              wait_for_workers=bool(task))
            Job.objects.create(
                key=key, request_id=key, owner=OWNER, command=command[:200], state=QUEUED,
                request=payload(request), process=process[:200], inbox=inbox,
                created_at=now, deadline=now + timedelta(seconds=timeout), task=task)
        rows.update(next_run_at=then.next_run_at, last_run_at=then.fire, last_request_id=key)
    return Fired(schedule.name, key, command, data, select, timeout, then.fire, then.missed,
                 task, keep)





def _fired_already(pk: int) -> None:
    """The job of this due time exists (its next due time was set back by hand to one
    that fired): not again; its next due time moves past now."""
    with transaction.atomic():
        schedule = Schedule.objects.select_for_update().filter(pk=pk).first()
        if schedule is None:
            return
        now = datetime.now(UTC)
        then = step(schedule.enabled, schedule.next_run_at, Timing.of(schedule), now)
        if then.fire is not None:
            log.warning("schedule %s: due time %s fired already; not again", schedule.name,
                        then.fire.isoformat())
            Schedule.objects.filter(pk=pk).update(next_run_at=then.next_run_at)


_schedulers: PerLoop[Scheduler] = PerLoop(Scheduler)

#: This process's scheduler (of this event loop), started on first use.
get_scheduler = _schedulers.get
#: Stop this loop's scheduler, if one was started.
stop_scheduler = _schedulers.stop
