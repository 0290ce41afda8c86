"""Writing to the database from one thread of its own, in raw multi-row statements.

The history writer and the job store each write in batches off the event loop. Each
has a :class:`DbThread`: one thread whose database connection stays open from one
batch to the next (``database_sync_to_async`` would close it after every call, and
closing SQLite's last connection checkpoints the WAL into the database file: a
quarter of the writer's time at 5,000 requests a second). The helpers below build
statements without Django's per-value overhead, which holds the GIL (and so stalls
the event loop) at these rates.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from django.conf import settings
from django.db import DatabaseError, connection

T = TypeVar("T")


class DbThread:
    """One thread, one database connection, for one writer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in the thread; if it fails, its connection is closed (it may
        be broken: the database restarted, the network dropped), so the next call
        connects afresh."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, _reconnect_after_failure, work, *args)

    async def close(self) -> None:
        """Close the thread's connection and let the thread go."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(pool, close_connection)
            pool.shutdown(wait=False)


def close_connection() -> None:
    """Close this thread's connection (``connection`` is per thread: look it up here)."""
    try:
        connection.close()
    except DatabaseError:
        pass


def _reconnect_after_failure(work: Callable[..., T], *args: Any) -> T:
    try:
        return work(*args)
    except Exception:
        close_connection()
        raise


def raw_execute(cursor: Any) -> tuple[Callable[[str, Any], Any], str]:
    """The cursor's execute and its parameter mark. For SQLite, the driver's own:
    Django's wrapper rewrites every ``%s`` into ``?`` with a regular expression, a
    fifth of the writer's time (holding the GIL) for statements of a thousand marks."""
    if connection.vendor == "sqlite":
        import sqlite3

        raw = cursor.cursor
        return (lambda sql, params: sqlite3.Cursor.execute(raw, sql, params)), "?"
    return cursor.execute, "%s"


def db_datetime() -> Callable[[float], Any]:
    """Timestamp -> what the database takes for a DateTimeField.

    Django's generic adapter costs a settings lookup and two conversions per value;
    for SQLite this writes the same naive UTC text directly (to the microsecond,
    truncated rather than rounded).
    """
    ops = connection.ops
    if not (connection.vendor == "sqlite" and settings.USE_TZ):
        return lambda ts: ops.adapt_datetimefield_value(utc(ts))
    seconds: dict[int, str] = {}  # a batch spans a second or two: format each once

    def moment(ts: float) -> str:
        whole = int(ts)
        text = seconds.get(whole)
        if text is None:
            text = seconds[whole] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
        return f"{text}.{int((ts - whole) * 1e6):06d}"

    return moment


def rows_per_statement(columns: int, most_rows: int = 500) -> int:
    """How many rows of ``columns`` values one statement may carry here (the
    database's parameter limit; a few dozen at least)."""
    most_params = connection.features.max_query_params or most_rows * columns
    return max(1, min(most_rows, most_params // columns))


def insert_rows(table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
                most_rows: int = 500, then: str = "") -> int:
    """``INSERT INTO table (columns) VALUES (...), (...) <then>``: as few statements as
    the database's parameter limit allows (:func:`rows_per_statement`); ``then`` may
    be an ``ON CONFLICT ...`` clause."""
    ops = connection.ops
    names = ", ".join(ops.quote_name(c) for c in columns)
    per_statement = rows_per_statement(len(columns), most_rows)
    with connection.cursor() as cursor:
        execute, mark = raw_execute(cursor)
        one_row = f"({', '.join([mark] * len(columns))})"
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            execute(f"INSERT INTO {ops.quote_name(table)} ({names}) "
                    f"VALUES {', '.join([one_row] * len(chunk))} {then}",
                    [value for row in chunk for value in row])
    return len(rows)


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)
