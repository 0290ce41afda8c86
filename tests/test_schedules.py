"""Periodic schedules without processes: due times (cron in a time zone across DST
changes, anchored intervals), the catch-up rule, validation, the firing transaction,
the admin, ``manage.py schedules`` and the docs' snippet."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from io import StringIO
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client

from dispatch.schedules import Timing, due_of, firing_id, step
from tests.procs import ROOT

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def at(*args: int, zone: ZoneInfo = UTC) -> datetime:  # type: ignore[assignment]
    return datetime(*args, tzinfo=zone)


def series(timing: Timing, start: datetime, n: int) -> list[datetime]:
    out = []
    for _ in range(n):
        start = timing.next_after(start)
        out.append(start)
    return out


# --------------------------------------------------------------------------- due times


def test_a_fixed_local_time_across_both_dst_changes() -> None:
    """02:30 in Berlin: on the day it does not exist (clocks jump 02:00 -> 03:00) it runs
    at 03:00; on the day it happens twice (03:00 -> 02:00) it runs once, at the first."""
    nightly = Timing("30 2 * * *", None, "Europe/Berlin")
    spring = series(nightly, at(2026, 3, 28, 12), 3)
    assert [d.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for d in spring] == [
        "03-29 03:00 CEST", "03-30 02:30 CEST", "03-31 02:30 CEST"]
    autumn = series(nightly, at(2026, 10, 24, 12), 3)
    assert [d.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for d in autumn] == [
        "10-25 02:30 CEST", "10-26 02:30 CET", "10-27 02:30 CET"]
    assert [d.strftime("%H:%M") for d in autumn] == ["00:30", "01:30", "01:30"]  # UTC
    # After the second pass of 02:00-03:00 has begun, 02:45 is tomorrow's (cronsim names
    # the first pass's, which is in the past: it is skipped).
    quarter_to = Timing("45 2 * * *", None, "Europe/Berlin")
    assert quarter_to.next_after(at(2026, 10, 25, 1, 40)) == at(2026, 10, 26, 1, 45)


def test_a_wildcard_hour_follows_elapsed_time_through_the_repeated_hour() -> None:
    every_half_hour = Timing("*/30 * * * *", None, "Europe/Berlin")
    got = series(every_half_hour, at(2026, 10, 24, 23, 10), 6)
    assert got == [at(2026, 10, 24, 23, 30) + timedelta(minutes=30 * i) for i in range(6)]
    assert [d.astimezone(BERLIN).strftime("%H:%M") for d in got] == [
        "01:30", "02:00", "02:30", "02:00", "02:30", "03:00"]


def test_intervals_are_anchored_to_the_epoch_so_they_never_drift() -> None:
    five_minutes = Timing("", 300, "Europe/Berlin")  # the zone plays no part
    assert five_minutes.next_after(at(2026, 1, 1, 12, 3, 7)) == at(2026, 1, 1, 12, 5)
    assert five_minutes.next_after(at(2026, 1, 1, 12, 5)) == at(2026, 1, 1, 12, 10)
    late = at(2026, 1, 1, 12, 5) + timedelta(seconds=0.9)  # a firing 0.9 s late
    assert five_minutes.next_after(late) == at(2026, 1, 1, 12, 10)  # no drift
    assert Timing("", 7, "UTC").next_after(at(1970, 1, 1, 0, 0, 13)) == at(1970, 1, 1, 0, 0, 14)


def test_the_catch_up_rule() -> None:
    minutely = Timing("", 60, "UTC")
    now = at(2026, 1, 1, 10, 5, 30)
    overdue = step(True, at(2026, 1, 1, 10, 0), minutely, now)  # down 10:00 to 10:05:30
    assert overdue.fire == at(2026, 1, 1, 10, 0) and overdue.missed == 6
    assert overdue.next_run_at == at(2026, 1, 1, 10, 6)  # the next after now, once
    on_time = step(True, at(2026, 1, 1, 10, 5), minutely, now)
    assert (on_time.fire, on_time.missed) == (at(2026, 1, 1, 10, 5), 1)
    assert step(True, at(2026, 1, 1, 10, 6), minutely, now).fire is None  # not yet
    assert step(False, at(2026, 1, 1, 10, 0), minutely, now) == step(False, None, minutely, now)
    assert step(False, None, minutely, now).next_run_at is None  # disabled: cleared
    fresh = step(True, None, minutely, now)  # (re-)enabled: from the next due time on
    assert (fresh.fire, fresh.next_run_at) == (None, at(2026, 1, 1, 10, 6))
    nightly = Timing("0 3 * * *", None, "Europe/Berlin")
    week = step(True, at(2026, 3, 1, 2), nightly, at(2026, 3, 8, 12))
    assert week.missed == 8 and week.next_run_at == at(2026, 3, 9, 2)


def test_a_firing_is_named_after_its_schedule_and_due_time() -> None:
    due = at(2026, 3, 29, 1, 0, 5)
    assert firing_id(7, due) == "schedule-7-20260329T010005Z"
    assert firing_id(7, due.astimezone(BERLIN)) == firing_id(7, due)
    assert due_of(firing_id(7, due)) == due and due_of("something-else") is None


# --------------------------------------------------------------------------- the model


@pytest.mark.django_db
@pytest.mark.parametrize("fields, field, words", [
    ({"command": "echo", "cron": "61 * * * *"}, "cron", "Bad minute"),
    ({"command": "echo", "cron": "* * *"}, "cron", "Wrong number of fields"),
    ({"command": "echo"}, "cron", "give a cron expression or an interval"),
    ({"command": "echo", "cron": "* * * * *", "every": 5}, "cron", "not both"),
    ({"command": "echo", "every": 0}, "every", "from 1 to"),
    ({"command": "echo", "every": 5, "timezone": "Mars/Olympus"}, "timezone", "unknown time"),
    ({"every": 5}, "command", "give a fleet command"),
    ({"command": "echo", "task": "app.tasks.t", "every": 5}, "command", "not both"),
    ({"command": "echo", "every": 5, "select": {"gpu": 1}}, "select", "labels"),
    ({"command": "echo", "every": 5, "timeout": 0}, "timeout", "more than 0"),
])
def test_a_schedule_that_cannot_fire_is_refused(fields: dict, field: str, words: str) -> None:
    from dispatch.models import Schedule

    schedule = Schedule(name="bad", **fields)
    with pytest.raises(ValidationError) as refused:
        schedule.clean()
    assert field in refused.value.message_dict, refused.value.message_dict
    assert words in " ".join(refused.value.message_dict[field])
    with pytest.raises(ValidationError):
        schedule.save()  # the shell is refused too
    assert not Schedule.objects.exists()


@pytest.mark.django_db
def test_saving_plans_the_next_due_time_and_never_writes_a_firing_back() -> None:
    from dispatch.models import Schedule

    s = Schedule.objects.create(name="tick", command="echo", every=3600)
    first = s.next_run_at
    assert first is not None and first.timestamp() % 3600 == 0 and first > datetime.now(UTC)
    s.data = {"message": "x"}
    s.save()  # timing unchanged: its due time too
    assert Schedule.objects.get().next_run_at == first
    stale = Schedule.objects.get()
    Schedule.objects.update(last_run_at=first, last_request_id="schedule-1-x",
                            next_run_at=first + timedelta(hours=1))  # a broker fired
    stale.data = {"message": "y"}
    stale.save()  # a form read before the firing: it writes back neither
    fresh = Schedule.objects.get()
    assert (fresh.next_run_at, fresh.last_request_id, fresh.data) == (
        first + timedelta(hours=1), "schedule-1-x", {"message": "y"})
    fresh.enabled = False
    fresh.save()
    assert Schedule.objects.get().next_run_at is None
    fresh.every = 60  # changed while disabled, then enabled: no catch-up
    fresh.enabled = True
    fresh.save()
    again = Schedule.objects.get().next_run_at
    assert again is not None and again - datetime.now(UTC) <= timedelta(seconds=60)


# --------------------------------------------------------------------------- firing


@pytest.mark.django_db(transaction=True)
def test_one_due_time_fires_once_however_often_it_is_tried() -> None:
    """The firing transaction, as two processes would run it one after the other: the
    second finds the schedule moved on. Set back by hand to a due time that fired, it
    does not fire again (the job key is taken): it moves on."""
    from dispatch.core.scheduler import _fire, _fire_all
    from dispatch.models import Job, Schedule

    due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=25)
    s = Schedule.objects.create(name="tick", command="echo", data={"message": "hi"},
                                every=10, select={"gpu": "t4"}, next_run_at=due)
    fired = _fire(s.pk, "proc-a", "inbox-a", True)
    assert fired is not None and not isinstance(fired, str)
    assert (fired.key, fired.due, fired.missed) == (firing_id(s.pk, due), due, 3)
    assert _fire(s.pk, "proc-b", "inbox-b", True) is None
    [job] = Job.objects.all()
    assert (job.key, job.request_id, job.owner, job.state, job.process, job.command) == (
        fired.key, fired.key, "operator", "queued", "proc-a", "echo")
    kept = json.loads(job.request)
    assert kept["data"] == {"message": "hi"} and kept["select"] == [["gpu", "t4"]]
    s.refresh_from_db()
    assert (s.last_run_at, s.last_request_id) == (due, fired.key)
    assert s.next_run_at > datetime.now(UTC)
    Schedule.objects.update(next_run_at=due)  # set back by hand
    fired_again, broken, _ = _fire_all([s.pk], "proc-b", "inbox-b", True)
    assert fired_again == [] and broken == {} and Job.objects.count() == 1
    assert Schedule.objects.get().next_run_at > datetime.now(UTC)


@pytest.mark.django_db(transaction=True)
def test_a_row_no_check_foresaw_holds_up_no_other_schedule() -> None:
    """Rows changed with QuerySet.update() skip save()'s checks: one that breaks its
    firing is put off a minute, and the others fire."""
    from dispatch.core.scheduler import _fire_all
    from dispatch.models import Job, Schedule

    due = datetime.now(UTC) - timedelta(seconds=1)
    bad = [Schedule.objects.create(name=f"bad{n}", command="echo", every=60).pk
           for n in range(2)]
    good = Schedule.objects.create(name="good", command="echo", every=60)
    Schedule.objects.filter(pk=bad[0]).update(every=10**15, next_run_at=due)
    Schedule.objects.filter(pk=bad[1]).update(select="notadict", next_run_at=due)
    Schedule.objects.filter(pk=good.pk).update(next_run_at=due)
    fired, broken, _ = _fire_all([*bad, good.pk], "proc-a", "inbox-a", True)
    assert [f.schedule for f in fired] == ["good"] and set(broken) == set(bad)
    assert Job.objects.count() == 1
    later = datetime.now(UTC) + timedelta(seconds=50)
    waits = [Schedule.objects.get(pk=pk).next_run_at for pk in bad]
    assert all(when is None or when > later for when in waits), waits  # (None: said once)


@pytest.mark.django_db(transaction=True)
def test_a_task_schedule_that_cannot_run_says_so_and_waits(monkeypatch) -> None:
    import dispatch.tasks

    from dispatch.core.scheduler import _fire_all
    from dispatch.models import Job, Schedule

    due = datetime.now(UTC) - timedelta(seconds=1)
    s = Schedule.objects.create(name="cleanup", task="app.tasks.cleanup", every=60,
                                next_run_at=due)
    fired, broken, _ = _fire_all([s.pk], "proc-a", "inbox-a", True)  # not loaded here
    assert fired == [] and not Job.objects.exists()
    assert "runs the Django task 'app.tasks.cleanup'" in broken[s.pk]
    assert "is not a task the broker loaded" in broken[s.pk] and "skipped" in broken[s.pk]
    assert Schedule.objects.get().next_run_at > datetime.now(UTC)

    monkeypatch.delattr(dispatch.tasks, "schedule_request")  # a broker without the backend
    Schedule.objects.filter(pk=s.pk).update(next_run_at=due)
    fired, broken, _ = _fire_all([s.pk], "proc-a", "inbox-a", True)
    assert fired == [] and "has no schedule_request" in broken[s.pk]


# --------------------------------------------------------------------------- admin, command


@pytest.mark.django_db
def test_the_admin_edits_schedules_and_shows_validation_errors(admin_client: Client) -> None:
    from dispatch.models import RequestRecord, Schedule

    form = {"name": "nightly", "enabled": "on", "command": "report", "task": "",
            "data": '{"day": "yesterday"}', "select": "{}", "timeout": "", "cron": "30 2 * * *",
            "every": "", "timezone": "Mars/Olympus"}
    page = admin_client.post("/admin/dispatch/schedule/add/", form).content.decode()
    assert "unknown time zone" in page and not Schedule.objects.exists()
    page = admin_client.post("/admin/dispatch/schedule/add/", {**form, "every": "60",
                                                               "timezone": "UTC"})
    assert "not both" in page.content.decode()
    done = admin_client.post("/admin/dispatch/schedule/add/", {**form,
                                                               "timezone": "Europe/Berlin"})
    assert done.status_code == 302
    s = Schedule.objects.get()
    assert s.next_run_at is not None and s.next_run_at.astimezone(BERLIN).strftime(
        "%H:%M") in ("02:30", "03:00")
    Schedule.objects.update(last_request_id="schedule-1-20260101T000000Z")
    RequestRecord.objects.create(request_id="schedule-1-20260101T000000Z", command="report",
                                 success=True, started_at=s.next_run_at,
                                 finished_at=s.next_run_at)
    listing = admin_client.get("/admin/dispatch/schedule/").content.decode()
    assert "30 2 * * *" in listing and "Europe/Berlin" in listing and ">report<" in listing
    assert "/admin/dispatch/requestrecord/?q=schedule-1-20260101T000000Z" in listing
    history = admin_client.get("/admin/dispatch/requestrecord/?q=schedule-1-20260101T000000Z")
    assert "schedule-1-20260101T000000Z" in history.content.decode()


@pytest.mark.django_db
def test_the_schedules_command_lists_them() -> None:
    from dispatch.models import Schedule

    out = StringIO()
    call_command("schedules", stdout=out)
    assert out.getvalue().startswith("No schedules.")
    Schedule.objects.create(name="nightly", command="report", cron="30 2 * * *",
                            timezone="Europe/Berlin")
    Schedule.objects.create(name="tick", command="echo", every=300, enabled=False)
    out = StringIO()
    call_command("schedules", stdout=out)
    header, nightly, tick = out.getvalue().splitlines()
    assert re.split(r"\s{2,}", header) == ["NAME", "RUNS", "WHEN", "TZ", "ENABLED",
                                           "NEXT DUE", "LAST FIRED", "LAST REQUEST"]
    assert re.split(r"\s{2,}", nightly)[:5] == ["nightly", "report", "30 2 * * *",
                                                "Europe/Berlin", "yes"]
    assert re.search(r" 0[23]:[03]0:00 \+0[12]00 ", nightly)
    assert re.split(r"\s{2,}", tick) == ["tick", "echo", "every 5 min", "UTC", "no", "-",
                                         "-", "-"]
    out = StringIO()
    call_command("schedules", "--json", stdout=out)
    listed = json.loads(out.getvalue())
    assert [s["name"] for s in listed] == ["nightly", "tick"]
    assert listed[1]["next_run_at"] is None and listed[0]["cron"] == "30 2 * * *"


@pytest.mark.django_db
def test_the_docs_shell_snippet_runs() -> None:
    """docs/scheduling.md's Python block, as printed, makes the schedules it says."""
    from dispatch.models import Schedule

    text = (ROOT / "docs" / "scheduling.md").read_text(encoding="utf-8")
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "Schedule.objects" in b]
    exec(compile(snippet, "docs/scheduling.md", "exec"), {})
    assert {s.name: (s.cron, s.every, s.timezone, s.enabled) for s in Schedule.objects.all()}\
        == {"nightly-report": ("30 2 * * *", None, "Europe/Berlin", True),
            "heartbeat": ("", 60, "UTC", False)}
