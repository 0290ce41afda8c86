"""``manage.py schedules``: the periodic schedules, when each is due and what it last did."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import BaseCommand, CommandParser

from dispatch.management.base import dumps, table
from dispatch.models import Schedule
from dispatch.schedules import ScheduleError, Timing, describe

COLUMNS = ("NAME", "RUNS", "WHEN", "TZ", "ENABLED", "NEXT DUE", "LAST FIRED", "LAST REQUEST")


class Command(BaseCommand):
    help = ("Lists the periodic schedules (read from the database): what each runs, when "
            "(cron expression or interval, time zone), whether it is enabled, its next due "
            "time and its last firing (shown in the schedule's time zone), and the request "
            "id of that firing (its job, then its history). Add and change them in the "
            "admin or the Django shell; see docs/scheduling.md.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true",
                            help="Print the schedules as JSON (times in ISO 8601, UTC) "
                                 "instead of a table.")

    def handle(self, *args: Any, **options: Any) -> None:
        schedules = list(Schedule.objects.all())
        if options["json"]:
            self.stdout.write(dumps([as_json(s) for s in schedules]))
        elif schedules:
            self.stdout.write(table(COLUMNS, [row(s) for s in schedules]))
        else:
            self.stdout.write("No schedules. Add one in the admin (Schedules) or the "
                              "Django shell: see docs/scheduling.md.")


def row(schedule: Schedule) -> tuple[str, ...]:
    runs, when = describe(schedule)
    return (schedule.name, runs, when, schedule.timezone,
            "yes" if schedule.enabled else "no", moment(schedule.next_run_at, schedule),
            moment(schedule.last_run_at, schedule), schedule.last_request_id or "-")


def moment(when: datetime | None, schedule: Schedule) -> str:
    """A time in the schedule's time zone (UTC for an unknown one), with its offset."""
    if when is None:
        return "-"
    try:
        zone = Timing.of(schedule).zone()
    except ScheduleError:
        zone = ZoneInfo("UTC")
    local = when.astimezone(zone)
    return f"{local:%Y-%m-%d %H:%M:%S} {local:%z}"


def as_json(schedule: Schedule) -> dict[str, Any]:
    def iso(when: datetime | None) -> str | None:
        return when.isoformat() if when is not None else None

    return {"name": schedule.name, "command": schedule.command, "task": schedule.task,
            "data": schedule.data, "select": schedule.select, "timeout": schedule.timeout,
            "cron": schedule.cron, "every": schedule.every, "timezone": schedule.timezone,
            "enabled": schedule.enabled, "next_run_at": iso(schedule.next_run_at),
            "last_run_at": iso(schedule.last_run_at),
            "last_request_id": schedule.last_request_id}
