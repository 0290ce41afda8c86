"""Periodic schedules: when each is due, and whether one is well formed. No I/O.

A :class:`~dispatch.models.Schedule` runs a fleet command (or a Django task) on a
cron expression in a time zone, or every so many seconds. This module says when it
is due next (:class:`Timing`), what a broker that finds it due does (:func:`step`:
the catch-up rule), what its firing is named (:func:`firing_id`), and whether its
fields make sense (:func:`check`, used by the model's ``clean()`` and ``save()``).
The firing itself, exactly once per due time in a cluster, is
:mod:`dispatch.core.scheduler`.

Due times:

- **cron**: a 5-field expression (minute hour day month weekday), or 6 fields with
  seconds first, read by `cronsim`_ in the schedule's time zone (``zoneinfo``). Around
  a DST change cronsim acts as Debian's cron: a job at a fixed local time that does not
  exist that day (02:30 when clocks jump from 02:00 to 03:00) runs at the first minute
  that does (03:00); one at a local time that happens twice (01:30 when clocks go back)
  runs once, at the first. Expressions with ``*`` in the minute or hour field follow
  elapsed time: ``*/15 * * * *`` runs every 15 minutes of real time, through both
  passes of a repeated hour.
- **every**: due times are the multiples of ``every`` seconds since the Unix epoch
  (``every=60``: on each minute; ``every=3600``: on each UTC hour): the next one does
  not depend on when the last firing happened, so they never drift. The time zone
  plays no part.

.. _cronsim: https://pypi.org/project/cronsim/
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError
from django.core.exceptions import ValidationError

if TYPE_CHECKING:
    from .models import Schedule

UTC = timezone.utc
#: Missed due times counted at most, for the log line of a catch-up firing.
COUNT_MISSED = 1000
#: The owner of every fired job (as the control API's requests): who may attach to it.
OWNER = "operator"


class ScheduleError(ValueError):
    """A schedule that cannot fire: its message says why, ``field`` what to fix."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


#: The longest interval: due times a year apart at most (beyond, dates overflow).
MAX_EVERY = 366 * 86400


@dataclass(frozen=True)
class Timing:
    """When a schedule is due: a cron expression in a time zone, or every N seconds."""

    cron: str = ""
    every: int | None = None
    timezone: str = "UTC"

    @classmethod
    def of(cls, schedule: Schedule) -> Timing:
        return cls(schedule.cron.strip(), schedule.every, schedule.timezone or "UTC")

    def check(self) -> None:
        """Raise :class:`ScheduleError` unless this timing can work out due times."""
        if bool(self.cron) == (self.every is not None):
            raise ScheduleError("give either a cron expression or an interval (every), "
                                "not both" if self.cron else
                                "give a cron expression or an interval (every)", "cron")
        if self.every is not None and not 1 <= self.every <= MAX_EVERY:
            raise ScheduleError(f"a whole number of seconds, from 1 to {MAX_EVERY} (a "
                                "year)", "every")
        zone = self.zone()
        if self.cron:
            try:
                CronSim(self.cron, datetime.now(zone))
            except (CronSimError, ValueError) as exc:
                raise ScheduleError(f"cron expression {self.cron!r}: {exc}", "cron") \
                    from None

    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown time zone {self.timezone!r} (an IANA name, "
                                "e.g. UTC or Europe/Berlin)", "timezone") from None

    def next_after(self, moment: datetime) -> datetime:
        """The first due time strictly after ``moment`` (an aware datetime), in UTC."""
        moment = moment.astimezone(UTC)
        if self.every is not None:
            whole = math.floor(moment.timestamp() / self.every) + 1
            return datetime.fromtimestamp(whole * self.every, UTC)
        times = CronSim(self.cron, moment.astimezone(self.zone()))
        for _ in range(10):
            due = next(times).astimezone(UTC)
            # cronsim reads fixed local times on the wall clock: after the second pass
            # of a repeated hour, it may name a time of the first pass (before moment).
            if due > moment:
                return due
        raise ScheduleError(f"cron expression {self.cron!r} names no time after {moment}")

    def count_between(self, first: datetime, until: datetime) -> int:
        """Due times from ``first`` (one) to ``until``, both included (at most
        COUNT_MISSED)."""
        if first > until:
            return 0
        if self.every is not None:
            return min(COUNT_MISSED, int((until - first).total_seconds() // self.every) + 1)
        count, due = 1, first
        while count < COUNT_MISSED:
            due = self.next_after(due)
            if due > until:
                break
            count += 1
        return count


@dataclass(frozen=True)
class Step:
    """What a broker does with a schedule it looks at, at ``now``."""

    fire: datetime | None  # the due time it fires for now (None: nothing to fire)
    next_run_at: datetime | None  # what the schedule's next due time becomes
    missed: int = 0  # due times this one firing stands for (more than 1: a catch-up)


def step(enabled: bool, next_run_at: datetime | None, timing: Timing, now: datetime) -> Step:
    """The catch-up rule.

    - Disabled: it does not fire, and its next due time is cleared, so that when it is
      enabled again it fires from the first due time after then (none in between).
    - No next due time yet (new, enabled again): the first due time after ``now``.
    - Not due yet: nothing.
    - Due, even long overdue (the broker was down over several due times): it fires
      once, for the due time it had (its firing is named after that one), standing for
      every due time missed up to ``now``; its next due time is the first after ``now``.
    """
    if not enabled:
        return Step(None, None)
    if next_run_at is None:
        return Step(None, timing.next_after(now))
    if next_run_at > now:
        return Step(None, next_run_at)
    return Step(next_run_at, timing.next_after(now), timing.count_between(next_run_at, now))


def firing_id(schedule_id: int, due: datetime) -> str:
    """The request id (and job key) of a schedule's firing for one due time: the same
    in every process, so a second insert of one firing breaks the job key's uniqueness."""
    return f"schedule-{schedule_id}-{due.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def due_of(request_id: str) -> datetime | None:
    """The due time a firing's request id names (None: not a firing's id)."""
    parts = request_id.split("-")
    if len(parts) != 3 or parts[0] != "schedule":
        return None
    try:
        return datetime.strptime(parts[2], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def check(schedule: Schedule) -> None:
    """Raise ValidationError (by field) unless the schedule can fire: exactly one of
    cron and every, a cron expression that parses, a known time zone, exactly one of
    command and task, data and select as JSON objects, a positive timeout."""
    errors: dict[str, str] = {}
    if bool(schedule.command.strip()) == bool(schedule.task.strip()):
        errors["command"] = ("give a fleet command or a Django task, not both"
                             if schedule.command.strip() else
                             "give a fleet command (or a Django task) to run")
    try:
        Timing.of(schedule).check()
    except ScheduleError as exc:
        errors[exc.field] = str(exc)
    if not isinstance(schedule.data, dict):
        errors["data"] = "a JSON object (the command's data)"
    if not isinstance(schedule.select, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in schedule.select.items()):
        errors["select"] = 'a JSON object of labels, e.g. {"gpu": "t4"}'
    if schedule.timeout is not None and not schedule.timeout > 0:
        errors["timeout"] = "seconds, more than 0 (empty: the broker's TIMEOUT)"
    if errors:
        raise ValidationError(errors)


#: The fields that decide a schedule's due times (a change sets its next one afresh).
TIMING_FIELDS = ("cron", "every", "timezone", "enabled")
#: What a broker writes as it fires a schedule: ``save()`` leaves them alone.
FIRED_FIELDS = ("last_run_at", "last_request_id")


def remember(schedule: Schedule) -> Schedule:
    """Note the timing a schedule has in the database (read, or just saved)."""
    schedule._loaded = {name: schedule.__dict__.get(name)  # type: ignore[attr-defined]
                        for name in (*TIMING_FIELDS, "next_run_at")}
    return schedule


def before_save(schedule: Schedule, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check a schedule being saved and set its next due time (:func:`planned`); the
    ``save()`` arguments that write what the user may change, and not what a broker
    wrote meanwhile (a form read a moment before a firing must not write that due time
    back: it would fire again)."""
    from django.utils import timezone as django_timezone

    check(schedule)
    loaded = getattr(schedule, "_loaded", None)
    schedule.next_run_at = planned(schedule, loaded, django_timezone.now())
    fields = kwargs.get("update_fields")
    if fields is not None:
        return {**kwargs, "update_fields": {*fields, "next_run_at"}}
    if loaded is None or schedule._state.adding:
        return kwargs
    return {**kwargs, "update_fields": [
        f.name for f in schedule._meta.concrete_fields
        if not f.primary_key and f.name not in FIRED_FIELDS
        and (f.name != "next_run_at" or schedule.next_run_at != loaded["next_run_at"])]}


def planned(schedule: Schedule, loaded: dict[str, Any] | None, now: datetime
            ) -> datetime | None:
    """The next due time a schedule being saved gets: worked out afresh when it is new
    or its timing or ``enabled`` changed (and its next due time was not set by hand);
    else the one it has. Disabled: none."""
    if not schedule.enabled:
        return None
    if loaded is None:  # new: from the first due time after now, unless one is given
        return schedule.next_run_at or Timing.of(schedule).next_after(now)
    if loaded["next_run_at"] != schedule.next_run_at:  # set by hand
        return schedule.next_run_at
    if any(loaded[k] != getattr(schedule, k) for k in TIMING_FIELDS):
        return Timing.of(schedule).next_after(now)
    return schedule.next_run_at


def time_zones() -> list[str]:
    """Every IANA time zone name this machine knows, sorted (the admin's choices)."""
    return sorted(available_timezones())


def task_request(schedule: Schedule) -> tuple[str, dict[str, Any]]:
    """The fleet command and data of the request that runs a task schedule's Django
    task: ``dispatch.tasks.schedule_request(schedule)``, which the tasks backend
    provides. A clear error when it does not."""
    try:
        from . import tasks
    except ImportError as exc:
        raise ScheduleError(f"schedule {schedule.name!r} runs the Django task "
                            f"{schedule.task!r}, but this broker has no tasks backend "
                            f"(dispatch.tasks: {exc})") from None
    make = getattr(tasks, "schedule_request", None)
    if make is None:
        raise ScheduleError(f"schedule {schedule.name!r} runs the Django task "
                            f"{schedule.task!r}, but dispatch.tasks has no "
                            "schedule_request(schedule)")
    try:
        command, data = make(schedule)
    except Exception as exc:  # noqa: BLE001 - said with the schedule's name, and skipped
        raise ScheduleError(f"schedule {schedule.name!r} runs the Django task "
                            f"{schedule.task!r}, which cannot be run here: "
                            f"{type(exc).__name__}: {exc}") from None
    return command, data


def task_keep(schedule: Schedule) -> float:
    """Seconds a scheduled Django task's result is kept: its backend's KEEP."""
    from .tasks.backend import DEFAULTS
    from .tasks.known import loaded_task

    task = loaded_task(schedule.task.strip())
    settings = getattr(task.get_backend(), "settings", DEFAULTS) if task else DEFAULTS
    return float(settings.get("KEEP") or DEFAULTS["KEEP"])


def what_it_runs(schedule: Schedule) -> tuple[str, dict[str, Any]]:
    """The command and data of a schedule's request."""
    if schedule.command.strip():
        return schedule.command.strip(), dict(schedule.data or {})
    return task_request(schedule)


def describe(schedule: Schedule) -> tuple[str, str]:
    """(what it runs, when) in a few words, for the admin and ``manage.py schedules``."""
    runs = schedule.command or f"task {schedule.task}"
    when = schedule.cron or (f"every {_seconds(schedule.every)}" if schedule.every else "-")
    return runs, when


def _seconds(every: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if every >= size and every % size == 0:
            return f"{every // size} {unit}"
    return f"{every} s"
