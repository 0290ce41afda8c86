"""Periodic schedules fired by real brokers: a real worker answers each firing; two
processes over PostgreSQL and Redis fire each due time once; a broker killed with
kill -9 across several due times fires one catch-up when it is back, then keeps time.

Each test reports how late after its due time each job was placed on a worker
(``record_property`` and the log): the accuracy of the firing."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest

from dispatch.schedules import due_of
from tests.procs import Broker, WorkerProc, wait_for
from tests.test_cluster import cluster, postgres_url, start_worker, workers_started  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

UTC = timezone.utc

#: Makes the schedule NAME (every second, echo) in the broker's database; prints its id.
MAKE = """
from dispatch.models import Schedule
s = Schedule.objects.create(name={name!r}, command="echo", data={{"message": {name!r}}},
                            every={every})
print(s.pk)
"""
#: Disables it (``save()``: its due time is cleared).
PAUSE = """
from dispatch.models import Schedule
s = Schedule.objects.get(name={name!r})
s.enabled = False
s.save()
"""

#: The firing transaction of schedule PK, as a process would run it that is killed as
#: soon as it committed (its job row stays queued, held by a process that is gone).
DIE_AFTER_COMMIT = """
import time
from dispatch.core.scheduler import _fire
while (fired := _fire({pk}, "gone:1:dead", "", True)) is None:
    time.sleep(0.05)
print(fired.key)
"""


def shell(broker: Broker, code: str, env: dict[str, str] | None = None) -> str:
    done = broker.manage("shell", "-v", "0", "-c", code, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


class Rows:
    """Reads the brokers' database: their SQLite file, or PostgreSQL."""

    def __init__(self, sqlite: Path | None = None, postgres: str | None = None) -> None:
        self.sqlite, self.postgres = sqlite, postgres

    def __call__(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.postgres is not None:
            import psycopg

            with psycopg.connect(self.postgres) as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        with sqlite3.connect(self.sqlite) as db:  # type: ignore[arg-type]
            return db.execute(sql, params).fetchall()

    def history(self, name: str) -> list[tuple[str, bool, Any, Any]]:
        """(request id, success, started_at, placed_at) of the schedule's firings."""
        return [(r[0], bool(r[1]), moment(r[2]), moment(r[3])) for r in self(
            "SELECT request_id, success, started_at, placed_at FROM dispatch_requestrecord "
            "WHERE requester = ? ORDER BY request_id", f"schedule {name}")]

    def jobs(self, pk: int | str) -> list[tuple[str, str, str]]:
        """(request id, state, answer) of the schedule's jobs (kept RESULT_TTL)."""
        return self("SELECT request_id, state, answer FROM dispatch_job WHERE request_id "
                    "LIKE ? ORDER BY request_id", f"schedule-{pk}-%")


def moment(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value.astimezone(UTC) if value is not None else None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)  # SQLite: naive UTC text


def per_due_time(request_ids: list[str]) -> dict[datetime, int]:
    counts: dict[datetime, int] = {}
    for rid in request_ids:
        due = due_of(rid)
        assert due is not None, rid
        counts[due] = counts.get(due, 0) + 1
    return counts


def consecutive(dues: list[datetime], every: int = 1) -> bool:
    return all(b - a == timedelta(seconds=every) for a, b in zip(dues, dues[1:]))


def none_missed(dues: list[datetime], *logs: str) -> bool:
    """Each due time fired, or (a process stalled over a due time) the firing after the
    gap said it stood for the ones missed."""
    return consecutive(dues) or any("fired once for" in log for log in logs)


def lateness(history: list[tuple[str, bool, Any, Any]]) -> dict[str, float]:
    """Seconds from each firing's due time to its placing on a worker: p50 and max."""
    late = [(placed - due_of(rid)).total_seconds() for rid, _, _, placed in history
            if placed is not None]
    return {"n": len(late), "p50_ms": round(statistics.median(late) * 1000, 1),
            "max_ms": round(max(late) * 1000, 1)}


def report(record_property: Callable[[str, Any], None], name: str, figures: Any) -> None:
    record_property(name, json.dumps(figures))
    logging.getLogger("tests.schedules").warning("figures %s: %s", name, figures)


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_a_schedule_fires_each_second_and_a_real_worker_answers_each_firing(
        broker: Broker, spawn_worker: Callable[..., WorkerProc], record_property) -> None:
    spawn_worker("w1")
    rows = Rows(sqlite=broker.db_path)
    pk = shell(broker, MAKE.format(name="tick", every=1))
    wait_for(lambda: len(rows.history("tick")) >= 4, 15, f"4 firings\n{broker.log()}")
    history = rows.history("tick")
    assert all(ok for _, ok, _, _ in history), history
    counts = per_due_time([rid for rid, *_ in history])
    assert set(counts.values()) == {1} and none_missed(sorted(counts), broker.log()), counts
    answered = {rid: (state, json.loads(answer)) for rid, state, answer in rows.jobs(pk)
                if state == "done"}
    assert {rid for rid, *_ in history} <= set(answered)  # each a durable job, answered
    assert all(a["data"] == "Echo: tick" and a["processed_by"] for _, a in answered.values())
    figures = lateness(history)
    report(record_property, "firing_lateness", figures)
    assert figures["max_ms"] < 1000, figures  # within the second it was due
    listing = broker.manage("schedules")
    assert listing.returncode == 0 and "tick" in listing.stdout
    assert "every 1 s" in listing.stdout and "schedule-" in listing.stdout


@pytest.mark.heavy
def test_two_processes_fire_each_due_time_once(cluster, workers_started,  # noqa: F811
                                               postgres_url: str,  # noqa: F811
                                               record_property) -> None:
    """Both processes look at the schedule at each due time (they wake together): one
    job and one history row per due time, none missed, whichever process fired it."""
    a, b = cluster(2, env={"DATABASE_URL": postgres_url})
    start_worker(workers_started, a, "w-a", "--url", b.worker_url)
    pg = {"DATABASE_URL": postgres_url}
    rows = Rows(postgres=postgres_url)
    pk = shell(a, MAKE.format(name="both", every=1), env=pg)
    wait_for(lambda: len(rows.history("both")) >= 6, 30, f"6 firings\n{a.log()}\n{b.log()}")
    shell(a, PAUSE.format(name="both"), env=pg)
    time.sleep(1.0)  # a firing under way is answered and written
    history = rows.history("both")
    jobs = rows.jobs(pk)
    counts = per_due_time([rid for rid, *_ in history])
    assert set(counts.values()) == {1}, counts  # each ran once (one history row)
    assert sorted(counts) == sorted(per_due_time([rid for rid, *_ in jobs]))
    assert none_missed(sorted(counts), a.log(), b.log()), sorted(counts)
    assert all(ok for _, ok, _, _ in history), history
    fired_by = rows("SELECT process, count(*) FROM dispatch_requestrecord WHERE requester = ? "
                    "GROUP BY process", "schedule both")
    report(record_property, "cluster_firing", {**lateness(history), "by_process": dict(
        (p.split(":")[1], n) for p, n in fired_by)})


@pytest.mark.heavy
def test_a_broker_killed_across_due_times_fires_one_catch_up_then_keeps_time(
        broker: Broker, spawn_worker: Callable[..., WorkerProc], record_property) -> None:
    """kill -9, down across several due times (every 1 s). Meanwhile a firing is made
    as a process would that was killed just after committing it (its job row queued,
    held by a process that is gone). Back: that job is taken over and answered once,
    the due times missed after it fire once together, and then each due time again."""
    spawn_worker("w1")
    rows = Rows(sqlite=broker.db_path)
    pk = int(shell(broker, MAKE.format(name="tock", every=1)))
    wait_for(lambda: len(rows.history("tock")) >= 2, 15, f"2 firings\n{broker.log()}")
    broker.stop(signal.SIGKILL)
    killed = datetime.now(UTC)
    left = shell(broker, DIE_AFTER_COMMIT.format(pk=pk))
    time.sleep(2.5)  # down across more due times
    broker.mark_log()
    broker.start()
    back = datetime.now(UTC)
    wait_for(lambda: len([r for r in rows.history("tock") if r[0] > left]) >= 3, 20,
             f"3 firings after the restart\n{broker.log()}")
    shell(broker, PAUSE.format(name="tock"))
    time.sleep(1.5)
    history = rows.history("tock")
    assert set(per_due_time([rid for rid, *_ in history]).values()) == {1}  # none ran twice
    assert all(ok for _, ok, _, _ in history), history
    jobs = rows.jobs(pk)  # the firings (an answer of the moment of the kill may have
    assert all(state == "done" for _, state, _ in jobs), jobs  # missed the history)
    dues = sorted(per_due_time([rid for rid, *_ in jobs]))
    left_due = due_of(left)
    before = [d for d in dues if d < left_due]
    after = [d for d in dues if d > left_due]
    assert left_due in dues  # the dead process's firing: taken over, answered
    assert left in {rid for rid, *_ in history}
    assert before and consecutive(before) and before[-1] < killed  # none lost before it
    assert before[-1] + timedelta(seconds=1) == left_due
    catch_up, *regular = after  # one for every due time missed while down...
    assert catch_up < back and regular and regular[0] > back - timedelta(seconds=1)
    assert consecutive(regular), after  # ...then each due time
    log = broker.log()
    assert log.count("fired once for") == 1, log
    report(record_property, "restart_firing", {
        "down_s": round((back - killed).total_seconds(), 1),
        "catch_up_missed": int(log.split("fired once for ")[1].split()[0]),
        **lateness([h for h in history if due_of(h[0]) in regular[1:]])})
