"""Batched history: buffering on the hot path, one-hop flushes, retries, drops."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

import pytest
from channels.db import database_sync_to_async
from django.db import IntegrityError, OperationalError
from django.test import override_settings

from dispatch import dbthread, history
from dispatch.history import (HistoryRecorder, NullRecorder, get_recorder,
                              mark_processes_offline)
from dispatch.models import RequestRecord, WorkerSession
from tests.conftest import close_thread_connections

T0 = 1_700_000_000.0
db = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def closing_thread_connections() -> AsyncIterator[None]:
    yield
    await close_thread_connections()


@pytest.fixture
def recorder() -> HistoryRecorder:
    return HistoryRecorder(process="test-proc", capacity=5_000, flush_seconds=0.05)


def record(rec: HistoryRecorder, i: int, **overrides: Any) -> None:
    fields: dict[str, Any] = dict(
        request_id=f"req-{i}", command="echo", worker_id="w1", success=True, error=None,
        latency_ms=1.5, attempts=1, requester="127.0.0.1:5000",
        started_at=T0 + i, finished_at=T0 + i + 0.002,
    )
    fields.update(overrides)
    rec.record_request(**fields)


def connect(rec: HistoryRecorder, session_id: str = "s1", **overrides: Any) -> None:
    fields: dict[str, Any] = dict(
        session_id=session_id, worker_id="w1", name="worker one", address="10.0.0.1:4000",
        process="test-proc", commands=["echo", "get_time"], weight=1.0,
        max_concurrency=8, connected_at=T0,
    )
    fields.update(overrides)
    rec.worker_connected(**fields)


@database_sync_to_async
def requests_in_db() -> list[RequestRecord]:
    return list(RequestRecord.objects.order_by("id"))


@database_sync_to_async
def session(session_id: str) -> WorkerSession:
    return WorkerSession.objects.get(session_id=session_id)


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap write_batch so a test can see how many thread hops a flush took."""
    calls: list[int] = []
    real = history.write_batch

    def counted(batch: history.Batch, process: str) -> int:
        calls.append(len(batch))
        return real(batch, process)

    monkeypatch.setattr(history, "write_batch", counted)
    return calls


def fail_next(monkeypatch: pytest.MonkeyPatch, exc: Exception, times: int = 1) -> None:
    real = history.write_batch
    left = [times]

    def failing(batch: history.Batch, process: str) -> int:
        if left[0]:
            left[0] -= 1
            raise exc
        return real(batch, process)

    monkeypatch.setattr(history, "write_batch", failing)


# --------------------------------------------------------------------------- hot path


def test_recording_touches_no_database(recorder: HistoryRecorder) -> None:
    # No django_db mark: any query here would fail the test.
    connect(recorder)
    for i in range(100):
        record(recorder, i)
    recorder.worker_seen("s1", T0 + 1)
    recorder.worker_disconnected("s1", T0 + 2, 100)
    assert recorder.pending == 103


def test_full_buffer_drops_oldest() -> None:
    rec = HistoryRecorder(process="p", capacity=10, flush_seconds=1)
    for i in range(25):
        record(rec, i)
    assert rec.dropped == 15
    assert [r["request_id"] for r in rec._batch.requests] == [f"req-{i}" for i in range(15, 25)]


def test_huge_fields_are_cut_when_recorded_and_the_buffer_is_bounded_in_bytes() -> None:
    """300 requests with 1 MB command names and errors once held 290 MB of history."""
    with override_settings(BROKER={"HISTORY_BUFFER_BYTES": 200_000}):
        rec = HistoryRecorder(process="p", capacity=50_000, flush_seconds=1)
    huge = "x" * 1_000_000
    for i in range(300):
        rec.record_request(request_id=huge, command=huge, worker_id=huge, success=False,
                           error=huge, latency_ms=1.0, attempts=1, requester=huge,
                           started_at=T0, finished_at=T0)
    kept = rec._batch.requests
    held = sum(len(v) for r in kept for v in r.values() if isinstance(v, str))
    assert kept and held <= 200_000 and rec.dropped == 300 - len(kept)
    assert {len(kept[0]["command"]), len(kept[0]["request_id"]), len(kept[0]["error"])} == \
        {200, 128, 1000}


# --------------------------------------------------------------------------- flushing


@db
async def test_many_records_one_flush(recorder: HistoryRecorder,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hops = count_hops(monkeypatch)
    for i in range(1_200):
        record(recorder, i, worker_id=None if i == 0 else "w1",
               success=i % 3 != 0, error="boom" if i % 3 == 0 else None)

    assert await recorder.flush() == 1_200
    assert hops == [1_200]
    assert recorder.pending == 0 and recorder.written == 1_200

    rows = await requests_in_db()
    assert len(rows) == 1_200
    first = rows[0]
    assert first.request_id == "req-0" and first.worker_id == "" and first.error == "boom"
    assert first.process == "test-proc" and first.requester == "127.0.0.1:5000"
    assert first.finished_at.timestamp() == pytest.approx(T0 + 0.002)
    assert first.finished_at.tzinfo is not None
    assert await recorder.flush() == 0  # nothing left, and no hop for nothing
    assert hops == [1_200]


@db
async def test_drops_are_logged_once_per_flush(caplog: pytest.LogCaptureFixture) -> None:
    rec = HistoryRecorder(process="p", capacity=10, flush_seconds=1)
    for i in range(25):
        record(rec, i)
    with caplog.at_level(logging.WARNING, logger="dispatch.history"):
        assert await rec.flush() == 10
        assert await rec.flush() == 0
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 15" in warnings[0]
    assert [r.request_id for r in await requests_in_db()] == [f"req-{i}" for i in range(15, 25)]


@db
async def test_seen_and_disconnect_fold_into_a_buffered_connect(
        recorder: HistoryRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    hops = count_hops(monkeypatch)
    connect(recorder)
    recorder.worker_seen("s1", T0 + 5)  # within SEEN_EVERY of its connect: not noted
    recorder.worker_seen("s1", T0 + 3 + history.SEEN_EVERY)
    recorder.worker_seen("s1", T0 + 2 + history.SEEN_EVERY)  # late and older: ignored
    recorder.worker_disconnected("s1", T0 + 10 + history.SEEN_EVERY, 7)

    assert await recorder.flush() == 1  # one row, born offline
    row = await session("s1")
    assert hops == [3]
    assert row.status == WorkerSession.Status.OFFLINE
    assert row.last_seen.timestamp() == T0 + 10 + history.SEEN_EVERY
    assert row.disconnected_at.timestamp() == T0 + 10 + history.SEEN_EVERY
    assert row.requests_served == 7
    assert row.commands == ["echo", "get_time"] and row.max_concurrency == 8


@db
async def test_a_registration_row_keeps_a_bounded_list_of_commands(
        recorder: HistoryRecorder) -> None:
    """A worker token registered workers of a thousand 200-character commands, 250 a
    second: 20 KB a row grew the database by 5 MB/s."""
    commands = [f"{i:04d}" + "c" * 196 for i in range(1000)]
    connect(recorder, commands=commands)
    assert await recorder.flush() == 1
    kept = (await session("s1")).commands
    assert kept[:9] == commands[:9] and kept[-1] == f"... and {1001 - len(kept)} more"
    assert len(json.dumps(kept)) < history.COMMAND_CHARS_KEPT + 200


@db
async def test_seen_is_coalesced_and_disconnect_updates_a_written_row(
        recorder: HistoryRecorder) -> None:
    connect(recorder, "s1")
    connect(recorder, "s2", worker_id="w2")
    await recorder.flush()

    every = history.SEEN_EVERY
    for i in range(1, 50):  # heartbeats: none in the first SEEN_EVERY (the row is new)
        recorder.worker_seen("s1", T0 + i)
    assert recorder.pending == 0
    for i in range(1, 50):  # then only the first of each SEEN_EVERY is written
        recorder.worker_seen("s1", T0 + every + i)
        recorder.worker_seen("s2", T0 + every + i / 10)
    assert recorder.pending == 2
    assert await recorder.flush() == 2
    assert (await session("s1")).last_seen.timestamp() == T0 + every + 1
    assert (await session("s2")).last_seen.timestamp() == pytest.approx(T0 + every + 0.1)

    recorder.worker_seen("s1", T0 + 1 + 2 * every)  # a minute on: written again
    assert recorder.pending == 1
    recorder.worker_disconnected("s1", T0 + 5 + 2 * every, 3)
    assert await recorder.flush() == 1
    row = await session("s1")
    assert row.status == WorkerSession.Status.OFFLINE and row.requests_served == 3
    assert row.disconnected_at.timestamp() == T0 + 5 + 2 * every
    assert row.last_seen.timestamp() == T0 + 5 + 2 * every
    assert (await session("s2")).status == WorkerSession.Status.ONLINE


@db
async def test_unknown_session_updates_are_harmless(recorder: HistoryRecorder) -> None:
    recorder.worker_seen("ghost", T0)
    recorder.worker_disconnected("ghost2", T0, 1)
    assert await recorder.flush() == 0
    assert recorder.pending == 0


@db
async def test_database_error_keeps_the_batch_for_retry(
        recorder: HistoryRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_next(monkeypatch, OperationalError("database is locked"), times=2)
    connect(recorder)
    for i in range(10):
        record(recorder, i)

    assert await recorder.flush() == 0  # logged, not raised
    assert await recorder.flush() == 0
    assert recorder.pending == 11
    recorder.worker_disconnected("s1", T0 + 9, 10)
    for i in range(10, 15):
        record(recorder, i)

    assert await recorder.flush() == 16
    assert [r.request_id for r in await requests_in_db()] == [f"req-{i}" for i in range(15)]
    assert (await session("s1")).status == WorkerSession.Status.OFFLINE


@db
async def test_retry_stays_within_the_buffer_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = HistoryRecorder(process="p", capacity=10, flush_seconds=1)
    fail_next(monkeypatch, OperationalError("down"))
    for i in range(8):
        record(rec, i)
    await rec.flush()
    for i in range(8, 14):
        record(rec, i)
    assert await rec.flush() == 10
    assert rec.dropped == 4
    assert [r.request_id for r in await requests_in_db()] == [f"req-{i}" for i in range(4, 14)]


@db
async def test_a_refused_batch_is_given_up_eventually(
        recorder: HistoryRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_next(monkeypatch, IntegrityError("bad row"), times=history.MAX_REFUSED_FLUSHES)
    record(recorder, 1)
    for _ in range(history.MAX_REFUSED_FLUSHES):
        assert await recorder.flush() == 0
    assert recorder.pending == 0 and recorder.dropped == 1
    record(recorder, 2)
    assert await recorder.flush() == 1  # history goes on


@db
async def test_any_failure_is_kept_not_raised(recorder: HistoryRecorder,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fail_next(monkeypatch, RuntimeError("Database access not allowed"))
    record(recorder, 1)
    assert await recorder.flush() == 0
    assert await recorder.flush() == 1


@db
async def test_long_strings_are_clipped_to_their_columns(recorder: HistoryRecorder) -> None:
    connect(recorder, name="n" * 500, max_concurrency=10**12)
    record(recorder, 1, command="c" * 500, requester="r" * 500)
    await recorder.flush()
    row = await session("s1")
    assert len(row.name) == 200 and row.max_concurrency == 2**31 - 1
    [req] = await requests_in_db()
    assert len(req.command) == 200 and len(req.requester) == 100


@db
async def test_start_flushes_in_the_background_and_stop_flushes_the_rest(
        recorder: HistoryRecorder) -> None:
    await recorder.start()
    await recorder.start()  # idempotent
    record(recorder, 1)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if recorder.written:
            break
    assert recorder.written == 1
    record(recorder, 2)
    await recorder.stop()
    assert len(await requests_in_db()) == 2


# --------------------------------------------------------------------------- per loop, off


async def test_get_recorder_is_one_per_loop() -> None:
    history.reset_recorders()
    try:
        rec = get_recorder()
        assert isinstance(rec, HistoryRecorder) and not isinstance(rec, NullRecorder)
        assert get_recorder() is rec
    finally:
        history.reset_recorders()


@db
async def test_disabled_history_records_nothing(settings: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    settings.BROKER = {**settings.BROKER, "HISTORY": False}
    rec = get_recorder()
    assert isinstance(rec, NullRecorder)
    await rec.start()
    connect(rec)
    record(rec, 1)
    rec.worker_seen("s1", T0)
    rec.worker_disconnected("s1", T0, 1)
    assert await rec.flush() == 0
    await rec.stop()
    assert await requests_in_db() == []
    assert await mark_processes_offline(keep=["test-proc"]) == 0


@db
async def test_rows_of_stopped_processes_go_offline(recorder: HistoryRecorder) -> None:
    connect(recorder, "s1", process="crashed")
    connect(recorder, "s2", process="crashed")
    connect(recorder, "s3", process="other")
    recorder.worker_seen("s1", T0 + 30)
    recorder.worker_disconnected("s2", T0 + 5, 1)
    await recorder.flush()

    assert await mark_processes_offline(keep=["other"], older_than=time.time() - T0 + 60) == 0
    assert await mark_processes_offline(keep=["other"]) == 1
    row = await session("s1")
    assert row.status == WorkerSession.Status.OFFLINE
    assert row.disconnected_at == row.last_seen
    assert (await session("s2")).disconnected_at.timestamp() == T0 + 5
    assert (await session("s3")).status == WorkerSession.Status.ONLINE


def test_recording_cost_is_small(recorder: HistoryRecorder) -> None:
    """A generous bound: 10k records must not take anywhere near a request's budget."""
    start = time.perf_counter()
    for i in range(10_000):
        record(recorder, i)
    assert time.perf_counter() - start < 1.0


@db
async def test_the_writer_keeps_its_connection_and_reconnects_after_a_failure(
        recorder: HistoryRecorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import connection

    def raw() -> Any:
        return connection.connection  # the driver's connection, None when closed

    record(recorder, 1)
    await recorder.flush()
    first = await recorder._write(raw)
    record(recorder, 2)
    await recorder.flush()
    assert first is not None and await recorder._write(raw) is first  # not reopened

    def broken(*_args: Any) -> int:
        raise OperationalError("server closed the connection unexpectedly")

    closed: list[bool] = []
    monkeypatch.setattr(history, "write_batch", broken)
    # (The in-memory test database ignores close(): count the closing instead.)
    monkeypatch.setattr(dbthread, "close_connection", lambda: closed.append(True))
    record(recorder, 3)
    assert await recorder.flush() == 0
    assert closed == [True]  # the next flush connects afresh
    monkeypatch.undo()
    assert await recorder.flush() == 1  # the kept record
    await recorder.stop()
    assert [r.request_id for r in await requests_in_db()] == ["req-1", "req-2", "req-3"]
