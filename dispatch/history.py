"""Request history and worker registrations, written in batches off the request path.

Consumers call the recording methods on the hot path, so those only append to
in-memory buffers: no await, no database, O(1). A background task writes whatever
has gathered every ``HISTORY_FLUSH_SECONDS`` in one thread hop and one transaction,
so the database sees a few bulk statements per second however busy the broker is.

History is best-effort by design: when the buffer is full the oldest records are
dropped (and counted) rather than slowing requests down, and a database that fails
is retried on the next flush rather than reported to any caller.

With ``HISTORY_RETENTION`` set, the same task deletes what has grown older than that
about once an hour, one short batch between two flushes (``manage.py prune_history``
does it by hand).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, Callable, Iterable

from channels.db import database_sync_to_async
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.db.models import Case, CharField, F, Model, QuerySet, Value, When

from . import conf
from .dbthread import DbThread, db_datetime, insert_rows, utc as _dt
from .models import RequestRecord, WorkerSession

logger = logging.getLogger("dispatch.history")

#: Failed flushes in a row after which a batch the database refuses for a reason
#: other than being unreachable is discarded, so one bad row cannot wedge history.
MAX_REFUSED_FLUSHES = 3
#: Rows per UPDATE ... CASE statement; keeps each statement's SQL a sane size.
UPDATE_CHUNK = 500
#: Rows per INSERT statement.
INSERT_CHUNK = 500
#: Seconds before reading the worker-id claims again after the database refused.
CLAIMS_RETRY_SECONDS = 10.0
#: Seconds between two "last seen" writes for one worker connection. Heartbeats come
#: every few seconds from every worker; writing each would cost a database update
#: per worker per flush, for a column the admin shows to the minute.
SEEN_EVERY = 60.0
#: Rows one pruning DELETE removes at most: a short statement, so that the table is
#: never locked for long (the writer's flushes and the admin get in between).
PRUNE_BATCH = 10_000
#: Seconds between two passes of pruning by the writer (``HISTORY_RETENTION``).
PRUNE_EVERY = 3600.0

_INT_MAX = 2**31 - 1
_SMALLINT_MAX = 2**15 - 1


# --------------------------------------------------------------------------- batch


#: Commands of a registration kept in its row, and their characters in all.
COMMANDS_KEPT = 100
COMMAND_CHARS_KEPT = 2000
#: Characters of an error text kept in a history row.
ERROR_CHARS = 1000
#: Bytes a request record costs beside its strings (the dict, floats, ints): an estimate.
RECORD_OVERHEAD = 600


@dataclass
class Batch:
    """Everything recorded since the last successful flush.

    Request records are bounded by count and by bytes (``capacity``, ``byte_limit``):
    the oldest go first. Connects are keyed by session so a ``seen`` or
    ``disconnected`` for a session still in the batch is folded into its row instead
    of needing one to exist.
    """

    capacity: int
    byte_limit: int
    requests: deque[dict[str, Any]] = field(default_factory=deque)
    request_bytes: int = 0
    connects: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    disconnects: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests) + len(self.connects) + len(self.seen) + len(self.disconnects)

    def add_request(self, record: dict[str, Any]) -> int:
        """Append one record (its ``size`` set); returns how many old ones fell off."""
        self.requests.append(record)
        self.request_bytes += record["size"]
        return self._trim()

    def _trim(self) -> int:
        dropped = 0
        while self.requests and (len(self.requests) > self.capacity
                                 or self.request_bytes > self.byte_limit):
            self.request_bytes -= self.requests.popleft()["size"]
            dropped += 1
        return dropped

    def absorb_newer(self, newer: Batch) -> int:
        """Append what was recorded while this (failed) batch was being written.

        Returns how many old request records fell off the front to stay bounded.
        """
        self.requests.extend(newer.requests)
        self.request_bytes += newer.request_bytes
        self.connects.update(newer.connects)
        for session_id, when in newer.seen.items():
            self.seen[session_id] = max(when, self.seen.get(session_id, when))
        self.disconnects.update(newer.disconnects)
        return self._trim()


# --------------------------------------------------------------------------- recorder


class HistoryRecorder:
    """Buffers history on the event loop; writes it from a background task.

    One per event loop (see :func:`get_recorder`): the buffers are plain containers
    touched only from that loop, which is what makes the recording methods safe
    without locks.
    """

    def __init__(self, *, process: str | None = None, capacity: int | None = None,
                 flush_seconds: float | None = None) -> None:
        self.process = process or conf.process_name()
        self.capacity = capacity if capacity is not None else conf.get("HISTORY_BUFFER")
        self.byte_limit = conf.get("HISTORY_BUFFER_BYTES")
        self.flush_seconds = (
            flush_seconds if flush_seconds is not None else conf.get("HISTORY_FLUSH_SECONDS")
        )
        self._batch = self._new_batch()
        self._retry: Batch | None = None  # a batch the database refused, kept for retry
        self._refused = 0  # flushes in a row that failed with a non-connection error
        self._failures = 0  # flushes in a row that failed for any reason
        self._dropped_unreported = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._seen_noted: dict[str, float] = {}  # session -> last "seen" put in a batch
        self._prune_cut: float | None = None  # what the pass under way deletes rows before
        self._prune_due = 0.0  # monotonic time of the next pass: the first comes at once
        self._pass_pruned = 0
        #: worker id -> (owner, until when the claim holds): who registered each id
        #: lately, read from the database once, then kept here (None: not read yet).
        self._claims: dict[str, tuple[str, float]] | None = None
        self._claims_lock = asyncio.Lock()
        self._claims_failed = 0.0
        self._writer = DbThread("history-writer")
        #: Totals since start, for health pages and tests.
        self.written = 0
        self.dropped = 0
        self.pruned = 0

    # ----------------------------------------------------------- hot path, no await

    def _new_batch(self) -> Batch:
        return Batch(self.capacity, self.byte_limit)

    def record_request(self, *, request_id: str, command: str, worker_id: str | None,
                       success: bool, error: str | None, latency_ms: float | None,
                       attempts: int, requester: str, started_at: float,
                       finished_at: float, workers_lost: int = 0,
                       code: str | None = None, routing: str = "",
                       placed_at: float | None = None, traceparent: str = "") -> None:
        """Remember one answered request; the oldest records go if the buffer is full.

        Strings are cut to their column's length here, not when written, so what a
        peer sent costs the buffer no more than the row will hold.
        """
        limit = _REQUEST_LIMITS
        record = {
            "request_id": request_id[:limit["request_id"]],
            "command": command[:limit["command"]],
            "worker_id": (worker_id or "")[:limit["worker_id"]], "success": success,
            "error": (error or "")[:ERROR_CHARS], "latency_ms": latency_ms,
            "attempts": attempts, "requester": requester[:limit["requester"]],
            "started_at": started_at, "finished_at": finished_at,
            "workers_lost": workers_lost, "code": (code or "")[:limit["code"]],
            "routing": routing[:limit["routing"]], "placed_at": placed_at,
            "traceparent": traceparent[:limit["traceparent"]],
        }
        record["size"] = RECORD_OVERHEAD + len(record["request_id"]) + len(record["command"]) \
            + len(record["worker_id"]) + len(record["error"]) + len(record["requester"]) \
            + len(record["routing"]) + len(record["traceparent"])
        dropped = self._batch.add_request(record)
        if dropped:
            self._count_drop(dropped)

    def worker_connected(self, *, session_id: str, worker_id: str, name: str, address: str,
                         process: str, commands: Iterable[str], weight: float,
                         max_concurrency: int, connected_at: float, owner: str = "") -> None:
        """Remember a new worker connection; written as a new online row.

        At most COMMANDS_KEPT commands, of COMMAND_CHARS_KEPT characters in all, are kept
        in the row (a registration may list a thousand of 200 characters: a row of
        that size per connection, registered 250 times a second, grew the database by
        5 MB/s).
        """
        if self._claims is not None:
            self._claims[worker_id] = (owner, math.inf)  # held while it is connected
        self._seen_noted[session_id] = connected_at  # its row says so: the next in a while
        offered, listed, chars = sorted(commands), [], 0
        for command in offered[:COMMANDS_KEPT]:
            chars += len(command)
            if chars > COMMAND_CHARS_KEPT:
                break
            listed.append(command)
        if len(listed) < len(offered):
            listed.append(f"... and {len(offered) - len(listed)} more")
        self._batch.connects[session_id] = {
            "session_id": session_id, "worker_id": worker_id, "name": name,
            "address": address, "process": process, "commands": listed,
            "weight": weight, "max_concurrency": max_concurrency,
            "connected_at": connected_at, "owner": owner,
        }

    async def recent_owner_other_than(self, worker_id: str, owner: str) -> bool:
        """Whether ``worker_id`` was last registered, within ``WORKER_ID_CLAIM_SECONDS``,
        by another owner than ``owner``.

        The registry keeps claims while it lives; this is what keeps them across a
        broker (or Redis) restart: the registration rows of the claim window, read
        once (a query per registration held 10,000 dialling workers to ~40 a second),
        then this process's own registrations and departures.
        """
        claims = self._claims if self._claims is not None else await self._load_claims()
        claim = claims.get(worker_id) if claims is not None else None
        if claim is None or claim[1] < time.time():
            return False
        return claim[0] not in ("", owner)

    async def _load_claims(self) -> dict[str, tuple[str, float]] | None:
        async with self._claims_lock:
            if (self._claims is not None
                    or time.monotonic() - self._claims_failed < CLAIMS_RETRY_SECONDS):
                return self._claims
            hold = conf.get("WORKER_ID_CLAIM_SECONDS")
            try:
                rows = await database_sync_to_async(_recent_owners)(time.time() - hold)
            except DatabaseError as exc:
                self._claims_failed = time.monotonic()
                logger.warning("history: could not read who registered which worker ids "
                               "lately (tried again in %.0f s): %s", CLAIMS_RETRY_SECONDS, exc)
                return None
            self._claims = {worker_id: (owner, seen + hold) for worker_id, owner, seen in rows}
            return self._claims

    def _prune_claims(self) -> None:
        if self._claims:
            now = time.time()
            self._claims = {k: v for k, v in self._claims.items() if v[1] >= now}

    def worker_seen(self, session_id: str, when: float) -> None:
        """Note a sign of life; at most one per SEEN_EVERY seconds reaches the database."""
        if when - self._seen_noted.get(session_id, 0.0) < SEEN_EVERY:
            return
        self._seen_noted[session_id] = when
        seen = self._batch.seen
        if when > seen.get(session_id, 0.0):
            seen[session_id] = when

    def worker_disconnected(self, session_id: str, when: float, requests_served: int,
                            worker_id: str = "") -> None:
        """Note that a connection ended; its row goes offline at the next flush."""
        claim = self._claims.get(worker_id) if self._claims is not None else None
        if claim is not None:
            self._claims[worker_id] = (claim[0], when + conf.get("WORKER_ID_CLAIM_SECONDS"))
        self._seen_noted.pop(session_id, None)
        seen = self._batch.seen
        seen[session_id] = max(when, seen.get(session_id, 0.0))
        self._batch.disconnects[session_id] = (when, requests_served)

    @property
    def pending(self) -> int:
        """Records waiting to be written, including a batch kept for retry."""
        return len(self._batch) + (len(self._retry) if self._retry else 0)

    def _count_drop(self, count: int) -> None:
        self.dropped += count
        self._dropped_unreported += count

    # ----------------------------------------------------------- background writing

    async def start(self) -> None:
        """Start the periodic flush task (once; later calls do nothing)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="dispatch.history.flush")

    async def stop(self) -> None:
        """Stop the periodic task and write what is left."""
        task, self._task = self._task, None
        if task is not None:
            async with self._lock:  # cancel between flushes, never halfway through one
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.flush()
        await self._writer.close()

    async def _write(self, work: Callable[..., Any], *args: Any) -> Any:
        return await self._writer.run(work, *args)

    async def flush(self) -> int:
        """Write everything buffered in one thread hop; return the rows written.

        Never raises: the batch is kept for the next flush and the failure logged,
        because the callers are request handlers and shutdown paths that must not
        fail for the sake of history.
        """
        async with self._lock:
            self._report_drops()
            batch = self._take()
            if not len(batch):
                return 0
            try:
                written = await self._write(write_batch, batch, self.process)
            except Exception as exc:
                self._keep_for_retry(batch, exc)
                return 0
            self._failures = self._refused = 0
            self.written += written
            return written

    async def prune_step(self) -> int:
        """Delete one batch of rows older than ``HISTORY_RETENTION``, if a pass is due
        or under way; return how many went.

        A pass deletes what was older than the retention when it began, PRUNE_BATCH
        rows per thread hop and one hop per flush, so flushes go on between batches
        and even a backlog of millions drains without holding up the writer.
        """
        retention = conf.get("HISTORY_RETENTION")
        if not retention or (self._prune_cut is None and time.monotonic() < self._prune_due):
            return 0
        if self._prune_cut is None:
            self._prune_cut = time.time() - retention
        async with self._lock:
            try:
                deleted = await self._write(prune_batch, _dt(self._prune_cut), PRUNE_BATCH)
            except DatabaseError as exc:
                logger.warning("history: pruning failed, trying again in %.0f s: %s",
                               PRUNE_EVERY, exc)
                deleted = 0
        self.pruned += deleted
        self._pass_pruned += deleted
        if not deleted:
            if self._pass_pruned:
                logger.info("history: deleted %d rows older than HISTORY_RETENTION (%.0f s)",
                            self._pass_pruned, retention)
            self._prune_cut, self._pass_pruned = None, 0
            self._prune_due = time.monotonic() + PRUNE_EVERY
        return deleted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
                await self.prune_step()
                self._prune_claims()
            except Exception:  # neither raises; this is a last line of defence
                logger.exception("history: flush or pruning failed unexpectedly")

    def _take(self) -> Batch:
        """Swap in a fresh buffer and return what was gathered, retry batch first."""
        batch, self._batch = self._batch, self._new_batch()
        if self._retry is not None:
            retry, self._retry = self._retry, None
            self._count_drop(retry.absorb_newer(batch))
            batch = retry
        return batch

    def _keep_for_retry(self, batch: Batch, exc: Exception) -> None:
        self._failures += 1
        if not _is_unreachable(exc):
            self._refused += 1
        if self._refused >= MAX_REFUSED_FLUSHES:
            logger.error("history: database refused the same batch %d times (%s); "
                         "discarding %d records", self._refused, exc, len(batch))
            self._count_drop(len(batch.requests))
            self._refused = 0
            return
        logger.warning("history: flush failed (%d in a row): %s; keeping %d records "
                       "for the next flush", self._failures, exc, len(batch),
                       exc_info=self._failures == 1)
        self._retry = batch

    def _report_drops(self) -> None:
        if self._dropped_unreported:
            logger.warning("history: buffer full (%d records or %d bytes); dropped %d of the "
                           "oldest", self.capacity, self.byte_limit, self._dropped_unreported)
            self._dropped_unreported = 0


class NullRecorder(HistoryRecorder):
    """What :func:`get_recorder` gives when ``HISTORY`` is off: records nothing."""

    def __init__(self) -> None:
        super().__init__(process="-", capacity=0, flush_seconds=3600.0)

    def record_request(self, **kwargs: Any) -> None:  # type: ignore[override]
        pass

    def worker_connected(self, **kwargs: Any) -> None:  # type: ignore[override]
        pass

    def worker_seen(self, session_id: str, when: float) -> None:
        pass

    def worker_disconnected(self, session_id: str, when: float, requests_served: int,
                            worker_id: str = "") -> None:
        pass

    async def recent_owner_other_than(self, worker_id: str, owner: str) -> bool:
        return False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def flush(self) -> int:
        return 0

    async def prune_step(self) -> int:
        return 0


def _is_unreachable(exc: Exception) -> bool:
    """Whether the database was unreachable or busy, so the same rows may succeed later."""
    return isinstance(exc, (OperationalError, InterfaceError))


# --------------------------------------------------------------------------- one per loop

_NULL = NullRecorder()
_recorders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HistoryRecorder] = (
    weakref.WeakKeyDictionary()
)
_loopless: HistoryRecorder | None = None


def get_recorder() -> HistoryRecorder:
    """The recorder of the running event loop (or a do-nothing one if history is off).

    Per loop rather than per process because its flush task and lock belong to a
    loop: a test suite runs many loops in one process, a broker runs one.
    """
    global _loopless
    if not conf.get("HISTORY"):
        return _NULL
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        if _loopless is None:
            _loopless = HistoryRecorder()
        return _loopless
    recorder = _recorders.get(loop)
    if recorder is None:
        recorder = _recorders[loop] = HistoryRecorder()
    return recorder


def reset_recorders() -> None:
    """Forget every recorder (tests); unflushed records are lost."""
    global _loopless
    _recorders.clear()
    _loopless = None


async def mark_processes_offline(*, keep: Iterable[str], older_than: float = 0.0) -> int:
    """Set rows that processes other than ``keep`` left "online" to offline.

    Those processes are gone (killed, crashed, a previous run): nobody is left to
    write their disconnects. Their end time is unknown; ``last_seen`` is the best
    estimate. Rows connected in the last ``older_than`` seconds are left alone: they
    may belong to a process that started a moment ago and is not yet known to be
    alive. A database problem is logged, not raised: the broker must keep running
    even if history cannot be tidied.
    """
    if not conf.get("HISTORY"):
        return 0
    kept = sorted(set(keep))
    try:
        count = await database_sync_to_async(_mark_offline)(kept, time.time() - older_than)
    except DatabaseError as exc:
        logger.warning("history: could not mark stale worker sessions offline: %s", exc)
        return 0
    if count:
        logger.info("history: marked %d worker session(s) of stopped broker processes "
                    "offline", count)
    return count


def _recent_owners(since: float) -> list[tuple[str, str, float]]:
    """(worker id, owner, last seen) of the registrations seen since ``since``, oldest
    first, so that the last one of each id wins."""
    return [(worker_id, owner, seen.timestamp()) for worker_id, owner, seen in
            WorkerSession.objects.filter(last_seen__gte=_dt(since)).order_by(
                "connected_at").values_list("worker_id", "owner", "last_seen").iterator()]


def _mark_offline(keep: list[str], connected_before: float) -> int:
    return WorkerSession.objects.filter(
        status=WorkerSession.Status.ONLINE, connected_at__lt=_dt(connected_before)
    ).exclude(process__in=keep).update(
        status=WorkerSession.Status.OFFLINE, disconnected_at=F("last_seen"))


# --------------------------------------------------------------------------- pruning (sync)


def old_rows(cut: datetime) -> dict[str, QuerySet]:
    """What retention deletes, by name: requests answered before ``cut`` and the
    registrations of connections that ended before it (an online one stays)."""
    return {
        "requests": RequestRecord.objects.filter(finished_at__lt=cut),
        "worker registrations": WorkerSession.objects.filter(
            status=WorkerSession.Status.OFFLINE, disconnected_at__lt=cut),
    }


def delete_batch(rows: QuerySet, batch: int) -> int:
    """Delete at most ``batch`` of ``rows`` in one statement; return how many went.

    ``DELETE ... WHERE id IN (SELECT id ... LIMIT batch)``: one short statement per
    batch (each its own transaction), never one that holds the table for minutes.
    """
    chosen = rows.order_by().values("pk")[:batch]
    deleted, _ = rows.model._default_manager.filter(pk__in=chosen).delete()
    return deleted


def prune_batch(cut: datetime, batch: int) -> int:
    """One batch of what is older than ``cut``, requests first; 0 when none is left."""
    for rows in old_rows(cut).values():
        deleted = delete_batch(rows, batch)
        if deleted:
            return deleted
    return 0


# --------------------------------------------------------------------------- writing (sync)


def write_batch(batch: Batch, process: str) -> int:
    """Write one batch in one transaction; runs in a worker thread.

    Order matters: connects first, so the updates for seen and disconnected can find
    rows created in the same flush (those are folded in before insert anyway).
    """
    with transaction.atomic():
        written = _insert_sessions(batch)
        written += _update_disconnected(
            {s: d for s, d in batch.disconnects.items() if s not in batch.connects},
            batch.seen,
        )
        written += _update_seen(
            {s: t for s, t in batch.seen.items()
             if s not in batch.disconnects and s not in batch.connects}
        )
        written += _insert_requests(batch.requests, process)
    return written


def _insert_sessions(batch: Batch) -> int:
    rows = [_session_row(c, batch.seen.get(c["session_id"]),
                         batch.disconnects.get(c["session_id"]))
            for c in batch.connects.values()]
    # ignore_conflicts: a session id already stored must not sink the whole batch.
    WorkerSession.objects.bulk_create(rows, batch_size=INSERT_CHUNK, ignore_conflicts=True)
    return len(rows)


def _session_row(c: dict[str, Any], seen: float | None,
                 disconnect: tuple[float, int] | None) -> WorkerSession:
    last_seen = max(c["connected_at"], seen or 0.0, disconnect[0] if disconnect else 0.0)
    row = WorkerSession(
        session_id=c["session_id"], worker_id=c["worker_id"], name=c["name"],
        address=c["address"], process=c["process"], commands=c["commands"],
        weight=c["weight"], max_concurrency=_clamp(c["max_concurrency"], _INT_MAX),
        connected_at=_dt(c["connected_at"]), last_seen=_dt(last_seen), owner=c["owner"],
    )
    if disconnect:
        row.status = WorkerSession.Status.OFFLINE
        row.disconnected_at = _dt(disconnect[0])
        row.requests_served = _clamp(disconnect[1], _INT_MAX)
    return _clip(row)


def _update_disconnected(disconnects: dict[str, tuple[float, int]],
                         seen: dict[str, float]) -> int:
    """Mark sessions offline: one UPDATE with CASE per chunk, not one per session."""
    updated = 0
    items = list(disconnects.items())
    for start in range(0, len(items), UPDATE_CHUNK):
        chunk = items[start:start + UPDATE_CHUNK]
        updated += WorkerSession.objects.filter(
            session_id__in=[s for s, _ in chunk]
        ).update(
            status=WorkerSession.Status.OFFLINE,
            disconnected_at=_case({s: _dt(when) for s, (when, _) in chunk}),
            last_seen=_case({s: _dt(max(when, seen.get(s, when))) for s, (when, _) in chunk}),
            requests_served=_case({s: _clamp(n, _INT_MAX) for s, (_, n) in chunk}),
        )
    return updated


def _update_seen(seen: dict[str, float]) -> int:
    updated = 0
    items = list(seen.items())
    for start in range(0, len(items), UPDATE_CHUNK):
        chunk = dict(items[start:start + UPDATE_CHUNK])
        updated += WorkerSession.objects.filter(session_id__in=list(chunk)).update(
            last_seen=_case({s: _dt(when) for s, when in chunk.items()})
        )
    return updated


#: RequestRecord columns written by :func:`_insert_requests`, in order.
_REQUEST_FIELDS = ("request_id", "command", "worker_id", "success", "error", "latency_ms",
                   "attempts", "requester", "process", "started_at", "finished_at",
                   "workers_lost", "code", "routing", "placed_at", "traceparent")


def _insert_requests(requests: Iterable[dict[str, Any]], process: str) -> int:
    """Plain tuples and multi-row ``INSERT``s, not model instances nor ``executemany``.

    Building a model per row held the GIL long enough to stall the event loop. And
    SQLite's ``executemany`` hands the GIL back and forth once per row (it lets go
    while SQLite works): thousands of forced switches a second, each one a pause of
    the event loop. One statement per few dozen rows keeps that to a handful.
    """
    proc = process[:_REQUEST_LIMITS["process"]]
    moment = db_datetime()
    # One pass, no helper calls per field: this runs for every request, beside the loop.
    # (Strings were cut to their columns when recorded.)
    rows = [(
        r["request_id"], r["command"], r["worker_id"], r["success"], r["error"],
        r["latency_ms"], min(r["attempts"], _SMALLINT_MAX), r["requester"], proc,
        moment(r["started_at"]), moment(r["finished_at"]),
        min(r["workers_lost"], _SMALLINT_MAX), r["code"], r["routing"],
        None if r["placed_at"] is None else moment(r["placed_at"]), r["traceparent"],
    ) for r in requests]
    meta = RequestRecord._meta
    return insert_rows(meta.db_table, tuple(meta.get_field(f).column for f in _REQUEST_FIELDS),
                       rows, INSERT_CHUNK)


def _case(values: dict[str, Any]) -> Case:
    """``CASE session_id WHEN ... THEN ...`` for a per-row value in one UPDATE."""
    return Case(*(When(session_id=s, then=Value(v)) for s, v in values.items()))


def _clamp(value: int, highest: int) -> int:
    return max(-highest, min(int(value), highest))


def _clip(row: Model) -> Model:
    """Cut strings to their column's length; PostgreSQL refuses longer ones outright."""
    for attname, max_length in _char_limits(type(row)):
        value = getattr(row, attname)
        if isinstance(value, str) and len(value) > max_length:
            setattr(row, attname, value[:max_length])
    return row


@cache
def _char_limits(model: type[Model]) -> tuple[tuple[str, int], ...]:
    return tuple((f.attname, f.max_length) for f in model._meta.concrete_fields
                 if isinstance(f, CharField) and f.max_length)


#: Column lengths of the request history's strings.
_REQUEST_LIMITS = dict(_char_limits(RequestRecord))
