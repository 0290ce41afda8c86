"""History retention: durations, ``manage.py prune_history``, and the writer's own pruning."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from io import StringIO
from typing import AsyncIterator

import pytest
from channels.db import database_sync_to_async
from django.core.management import CommandError, call_command
from django.test import override_settings

from dispatch import conf, history
from dispatch.conf import BadSetting
from dispatch.history import HistoryRecorder
from dispatch.models import RequestRecord, WorkerSession
from tests.conftest import close_thread_connections

NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)


@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * 86400), ("12h", 12 * 3600), ("2w", 14 * 86400), ("90m", 5400),
    ("45s", 45), ("3600", 3600), ("1.5h", 5400), (" 7D ", 7 * 86400), ("0", 0),
])
def test_durations_are_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert conf.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "-1d", "30 days", "1d12h", "1e3", "30y", "soon"])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        conf.parse_duration(text)


def test_the_retention_setting_takes_durations_and_seconds() -> None:
    assert conf.load({"HISTORY_RETENTION": "30d"}).HISTORY_RETENTION == 30 * 86400
    assert conf.load({"HISTORY_RETENTION": "600"}).HISTORY_RETENTION == 600
    assert conf.load({}).HISTORY_RETENTION == 0  # kept forever
    with pytest.raises(BadSetting, match="BROKER_HISTORY_RETENTION='a month'"):
        conf.load({"HISTORY_RETENTION": "a month"})


def request_row(request_id: str, age: timedelta) -> RequestRecord:
    return RequestRecord(request_id=request_id, command="echo", worker_id="w1", success=True,
                         started_at=NOW - age, finished_at=NOW - age)


def session_row(session_id: str, age: timedelta, online: bool = False) -> WorkerSession:
    return WorkerSession(
        session_id=session_id, worker_id="w1", connected_at=NOW - age - DAY,
        last_seen=NOW - age, disconnected_at=None if online else NOW - age,
        status=WorkerSession.Status.ONLINE if online else WorkerSession.Status.OFFLINE)


def fill() -> None:
    """Five requests and two sessions a month old, three requests and one session of
    yesterday, and an online session connected long ago (it must stay)."""
    RequestRecord.objects.bulk_create([
        *(request_row(f"old-{i}", 31 * DAY) for i in range(5)),
        *(request_row(f"new-{i}", DAY) for i in range(3))])
    WorkerSession.objects.bulk_create([
        session_row("s-old-1", 40 * DAY), session_row("s-old-2", 31 * DAY),
        session_row("s-new", DAY), session_row("s-online", 60 * DAY, online=True)])


def remaining() -> tuple[list[str], list[str]]:
    return (sorted(RequestRecord.objects.values_list("request_id", flat=True)),
            sorted(WorkerSession.objects.values_list("session_id", flat=True)))


NEW = (["new-0", "new-1", "new-2"], ["s-new", "s-online"])


@pytest.mark.django_db
def test_prune_history_deletes_what_is_older_than_the_cut_in_batches() -> None:
    fill()
    out = StringIO()
    call_command("prune_history", "--older-than", "30d", "--batch", "2", stdout=out)
    assert remaining() == NEW
    text = out.getvalue()
    assert "requests: 2 of 5 deleted ..." in text and "requests: 4 of 5 deleted ..." in text
    assert "requests: 5 older than" in text and "worker registrations: 2 older than" in text


@pytest.mark.django_db
def test_a_dry_run_only_counts() -> None:
    fill()
    out = StringIO()
    call_command("prune_history", "--older-than", "2w", "--dry-run", stdout=out)
    assert len(remaining()[0]) == 8 and len(remaining()[1]) == 4
    assert "requests: 5 older than" in out.getvalue() and "would be deleted" in out.getvalue()
    assert "worker registrations: 2 older than" in out.getvalue()


@pytest.mark.django_db
def test_prune_history_defaults_to_the_retention_setting_and_needs_one() -> None:
    fill()
    with pytest.raises(CommandError, match="--older-than 30d"):
        call_command("prune_history", stdout=StringIO())
    with pytest.raises(CommandError, match="not a duration"):
        call_command("prune_history", "--older-than", "a while", stdout=StringIO())
    with pytest.raises(CommandError, match="more than 0"):
        call_command("prune_history", "--older-than", "0d", stdout=StringIO())
    with override_settings(BROKER={"HISTORY_RETENTION": "30d"}):
        call_command("prune_history", stdout=StringIO())
    assert remaining() == NEW


# --------------------------------------------------------------------------- the writer's pass

db = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def closing_thread_connections() -> AsyncIterator[None]:
    yield
    await close_thread_connections()


@pytest.fixture
def retention_30d(settings) -> None:
    settings.BROKER = {**settings.BROKER, "HISTORY_RETENTION": "30d"}


@db
async def test_the_writer_prunes_by_itself_in_batches_between_flushes(
        retention_30d: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "PRUNE_BATCH", 2)
    await database_sync_to_async(fill)()
    recorder = HistoryRecorder(process="test-proc", flush_seconds=0.02)
    await recorder.start()
    recorder.record_request(request_id="during", command="echo", worker_id="w1",
                            success=True, error=None, latency_ms=1.0, attempts=1,
                            requester="r", started_at=NOW.timestamp(),
                            finished_at=NOW.timestamp())
    try:
        for _ in range(250):
            if recorder.pruned == 7:
                break
            await asyncio.sleep(0.02)
    finally:
        await recorder.stop()
    requests, sessions = await database_sync_to_async(remaining)()
    assert (requests, sessions) == (sorted([*NEW[0], "during"]), NEW[1])
    assert recorder.pruned == 7


@db
async def test_a_pass_comes_about_once_an_hour(retention_30d: None) -> None:
    await database_sync_to_async(fill)()
    recorder = HistoryRecorder(process="test-proc")
    while await recorder.prune_step():  # the first pass comes at once
        pass
    assert await database_sync_to_async(remaining)() == NEW
    await database_sync_to_async(request_row("late", 31 * DAY).save)()
    assert await recorder.prune_step() == 0  # the next one only in PRUNE_EVERY
    assert "late" in (await database_sync_to_async(remaining)())[0]


@db
async def test_no_retention_no_pruning() -> None:
    await database_sync_to_async(fill)()
    assert await HistoryRecorder(process="test-proc").prune_step() == 0
    assert len((await database_sync_to_async(remaining)())[0]) == 8
