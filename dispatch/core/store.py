"""The job store: every accepted request, kept in the database until it is answered.

The dispatcher tells it, without awaiting, what happens to each request: accepted,
given to a worker, answered. What gathers in ``STORE_COMMIT_SECONDS`` (a few
milliseconds) is written in one transaction from a thread of its own, off the event
loop; what happened to one request within one such window becomes one row written
once (a quick request is inserted already answered). :meth:`JobStore.committed`
tells a requester that asked (``"accepted": true``) when its request is safe: from
then on, a crash of the broker (kill -9) loses it no more.

At start, the rows not done are served again (:meth:`JobStore.take_over`); answered
rows keep their answer ``RESULT_TTL`` seconds for a requester that comes back.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connection, transaction

from workers import protocol
from workers.protocol import ErrorCode

from .. import conf
from ..history import SEEN_EVERY
from ..dbthread import (DbThread, db_datetime, insert_rows, raw_execute, rows_per_statement,
                        utc)
from ..models import Job, WorkerSession
from .requests import Request

log = logging.getLogger("dispatch.store")

#: Seconds between retries of a commit the database refused.
RETRY_SECONDS = 1.0
#: Done rows deleted per statement when their answers are no longer kept.
PRUNE_BATCH = 5000
#: Seconds between two prunings of done rows.
PRUNE_EVERY = 10.0

_COLUMNS = ("key", "request_id", "owner", "command", "state", "request", "worker_id",
            "retry_safe", "process", "inbox", "restarts", "created_at", "deadline",
            "finished_at", "answer", "task", "tried", "started_at", "attempted_at",
            "not_before", "expires_at", "replay_of", "progress", "code")
_AT = {name: i for i, name in enumerate(_COLUMNS)}
_STATE, _WORKER, _RETRY_SAFE = _AT["state"], _AT["worker_id"], _AT["retry_safe"]
_ANSWER, _FINISHED, _REQUEST = _AT["answer"], _AT["finished_at"], _AT["request"]
_TRIED, _STARTED, _ATTEMPTED = _AT["tried"], _AT["started_at"], _AT["attempted_at"]
_EXPIRES, _PROGRESS, _CODE = _AT["expires_at"], _AT["progress"], _AT["code"]
#: What a row written again changes (the rest is the same since it was accepted).
_CHANGING = ("state", "worker_id", "retry_safe", "finished_at", "answer", "tried",
             "started_at", "attempted_at", "expires_at", "progress", "code")
_TIMES = tuple(_AT[name] for name in ("created_at", "deadline", "finished_at", "started_at",
                                      "attempted_at", "not_before", "expires_at"))
#: Failures that are the fleet's, not the request's: kept DEAD_LETTER_TTL, to run again.
DEAD_LETTERS = frozenset(c.value for c in (
    ErrorCode.WORKER_LOST, ErrorCode.LEASE_EXPIRED, ErrorCode.TIMEOUT,
    ErrorCode.HANDLER_FAILED, ErrorCode.WORKER_ERROR))
QUEUED, RUNNING, DONE = Job.State.QUEUED.value, Job.State.RUNNING.value, Job.State.DONE.value


@dataclass(slots=True)
class Kept:
    """A row read back at start: a request that was accepted and not answered."""

    key: str
    request_id: str
    owner: str
    command: str
    state: str
    request: dict[str, Any]
    worker_id: str
    retry_safe: bool
    restarts: int
    created_at: float
    deadline: float
    inbox: str  # where the process that held it took answers
    not_before: float  # unix time (0: not deferred)


def payload(request: Request) -> str:
    """What a row keeps of a request beside its columns: enough to run it again (its
    data, and of the rest what differs from the defaults)."""
    kept: dict[str, Any] = {"data": request.data, "requester": request.requester}
    for name in ("priority", "affinity", "hedge", "target", "traceparent", "task", "keep",
                 "replay_of", "wait_for_workers"):
        value = getattr(request, name)
        if value:
            kept[name] = value
    if request.select:
        kept["select"] = [list(p) for p in request.select]
    return protocol.dumps(kept)


class JobStore:
    """Rows of one process's requests, written in commits a few milliseconds apart."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.inbox = ""  # this process's channel (set once the exchange has one)
        #: key -> the whole row (column order) of each request accepted here and not yet
        #: written as answered: a change is written as the row, in one statement for many.
        self._rows: dict[str, list[Any]] = {}
        self._dirty: set[str] = set()  # keys of the rows to write at the next commit
        #: key -> columns to update, for rows not held here (read back after a restart)
        self._changes: dict[str, dict[str, Any]] = {}
        self._waiting: list[asyncio.Future[None]] = []  # resolved by the next commit
        self._wake = asyncio.Event()
        self._thread = DbThread("job-store")
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self.commits = 0
        self.kept_bytes = KeptBytes()

    # ------------------------------------------------------------------ on the loop

    def accepted(self, request: Request) -> None:
        # The request itself stands for its payload: encoded only if it is still
        # unanswered when committed.
        self._rows[request.key] = [
            request.key, request.request_id, request.owner[:40], request.command[:200], QUEUED,
            request, "", True, self.process[:200], self.inbox, 0, request.started,
            request.started + (request.deadline - request.opened), None, "", request.task,
            request.tried, None, None,
            request.started + (request.not_before - request.opened) if request.not_before
            else None, None, request.replay_of, "", ""]
        self._dirty.add(request.key)
        self._wake.set()

    def placed(self, request: Request, worker_id: str) -> None:
        now = time.time()
        row = self._rows.get(request.key)
        if row is None:
            self._change(request.key, state=RUNNING, worker_id=worker_id,
                         retry_safe=request.retry_safe, tried=protocol.dumps(request.tried),
                         attempted_at=now)
            return
        row[_STATE], row[_WORKER], row[_RETRY_SAFE] = RUNNING, worker_id, request.retry_safe
        row[_STARTED], row[_ATTEMPTED] = row[_STARTED] or now, now
        self._dirty.add(request.key)
        self._wake.set()

    def progressed(self, request: Request) -> None:
        """A Django task's progress report, written with the next commit (the latest of
        those within one commit interval)."""
        value, message = request.reported or (None, None)
        text = protocol.dumps([value, (message or "")[:200]])
        row = self._rows.get(request.key)
        if row is None:
            self._change(request.key, progress=text)
            return
        row[_PROGRESS] = text
        self._dirty.add(request.key)
        self._wake.set()

    def answered(self, request: Request, text: str, when: float, code: str | None) -> None:
        keep = request.keep
        if code in DEAD_LETTERS:  # kept to be run again from the admin
            keep = max(keep, conf.get("DEAD_LETTER_TTL"))
        expires = when + keep if keep > conf.get("RESULT_TTL") and \
            self.kept_bytes.take(request.owner, len(text) + request.cost, when + keep) else None
        row = self._rows.get(request.key)
        if row is None:
            self._change(request.key, state=DONE, answer=text, finished_at=when,
                         expires_at=expires, code=code or "")
            return
        row[_STATE], row[_ANSWER], row[_FINISHED] = DONE, text, when
        row[_EXPIRES], row[_CODE] = expires, code or ""
        if isinstance(row[_REQUEST], Request) and expires is None:
            row[_REQUEST] = ""  # answered before it was ever written: a done row needs its
            # answer only (a refused one cost disk); one kept long (a task's result, a dead
            # letter) its request too
        self._dirty.add(request.key)
        self._wake.set()

    def _change(self, key: str, **columns: Any) -> None:
        """A row not held here (read back after a restart): its columns are updated."""
        self._changes.setdefault(key, {}).update(columns)
        self._wake.set()

    def committed(self) -> asyncio.Future[None]:
        """Done once everything told so far is in the database."""
        future = asyncio.get_running_loop().create_future()
        if not self._dirty and not self._changes:
            future.set_result(None)
        else:
            self._waiting.append(future)
        return future

    @property
    def pending(self) -> int:
        return len(self._dirty) + len(self._changes)

    # ------------------------------------------------------------------ writing

    async def start(self) -> None:
        for owner, size, until in await self._thread.run(_kept_by_owner, time.time()):
            self.kept_bytes.add(owner, size, until)
        self._task = asyncio.create_task(self._run(), name="dispatch-store")

    async def flush(self) -> None:
        """Write what is told so far, now (a stopping broker commits what it holds)."""
        try:
            await self._commit()
        except Exception as exc:  # noqa: BLE001 - stopping: said, and the stop goes on
            log.error("job store: could not write %d change(s): %s", self.pending, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        await self._thread.close()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(conf.get("STORE_COMMIT_SECONDS"))  # gather a group
            try:
                await self._commit()
            except Exception as exc:  # noqa: BLE001 - kept, and tried again
                log.warning("job store: commit failed, trying again in %.0f s: %s",
                            RETRY_SECONDS, exc, exc_info=not isinstance(exc, DatabaseError))
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if time.monotonic() - self._pruned_at > PRUNE_EVERY:
                self._pruned_at = time.monotonic()
                await self._prune()

    async def _commit(self) -> None:
        dirty, changes, waiting = self._dirty, self._changes, self._waiting
        self._dirty, self._changes, self._waiting = set(), {}, []
        self._wake.clear()
        if not dirty and not changes:
            _resolve(waiting)
            return
        rows = [list(self._rows[key]) for key in dirty]  # as they are now: the loop goes on
        for row in rows:  # unanswered still: its payload is written (Python, on the loop: in
            if isinstance(row[_REQUEST], Request):  # the database's thread it would
                row[_REQUEST] = payload(row[_REQUEST])  # contend for the GIL)
            row[_TRIED] = protocol.dumps(row[_TRIED]) if row[_TRIED] else ""
        try:
            await self._thread.run(_write, rows, changes)
        except BaseException:
            self._dirty |= dirty  # tried again at the next commit, as they are then
            for key, columns in changes.items():
                self._changes[key] = {**columns, **self._changes.get(key, {})}
            self._waiting = waiting + self._waiting
            self._wake.set()
            raise
        for row in rows:
            held = self._rows.get(row[0])
            if held is None:
                continue
            if held[_STATE] == DONE and row[0] not in self._dirty:
                del self._rows[row[0]]  # written answered: nothing more to write of it
            else:  # written: a later write changes only _CHANGING, and keeps this
                held[_REQUEST] = ""
        self.commits += 1
        _resolve(waiting)

    async def _prune(self) -> None:
        ttl = conf.get("RESULT_TTL")
        try:
            await self._thread.run(_prune_done, time.time() - ttl)
        except DatabaseError as exc:
            log.warning("job store: could not delete answered jobs: %s", exc)

    # ------------------------------------------------------------------ reading

    async def take_over(self, dead: list[str] | None) -> list[Kept]:
        """The unanswered rows of the ``dead`` processes (None: of every process), now
        this one's, each counted as having lived through a restart."""
        return await self._thread.run(_take_over, self.process, self.inbox, dead)

    async def holders(self) -> set[str]:
        """The processes that hold unanswered rows."""
        return await self._thread.run(_holders)

    async def answered_lately(self) -> list[tuple[str, str, str]]:
        """(owner, request id, answer) of the requests answered within RESULT_TTL."""
        return await self._thread.run(_answered_since, time.time() - conf.get("RESULT_TTL"))

    async def had_workers_lately(self, seconds: float) -> bool:
        """Whether workers were connected within ``seconds``: after a restart, they are
        on their way back. (A registration's "last seen" is written once a minute.)"""
        return await self._thread.run(_seen_since, time.time() - seconds - SEEN_EVERY)

    async def unanswered(self, owner: str, request_id: str) -> bool:
        """Whether a request of ``owner`` is held, not answered yet (by any process)."""
        return await self._thread.run(_unanswered, owner, request_id)

    async def kept(self, owner: str, request_id: str) -> str | None:
        """The answer of a request answered lately (within RESULT_TTL), if any."""
        return await self._thread.run(_answer_of, owner, request_id)


class KeptBytes:
    """What each credential has kept past RESULT_TTL (``keep``, dead letters), in bytes:
    within MAX_KEPT_BYTES per process, or a tenant could fill the disk with answers kept
    a month."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self._until: list[tuple[float, str, int]] = []  # (expires, owner, bytes), a heap
        self._said: dict[str, float] = {}  # owner -> when it was last said to be over

    def add(self, owner: str, size: int, until: float) -> None:
        self.bytes[owner] += size
        heapq.heappush(self._until, (until, owner, size))

    def take(self, owner: str, size: int, until: float) -> bool:
        """Whether ``size`` more bytes of ``owner`` may be kept until ``until``."""
        now = time.time()
        while self._until and self._until[0][0] <= now:
            _, gone, freed = heapq.heappop(self._until)
            self.bytes[gone] -= freed
            if self.bytes[gone] <= 0:
                del self.bytes[gone]
        if self.bytes[owner] + size > conf.get("MAX_KEPT_BYTES"):
            if now - self._said.get(owner, 0.0) > 60:
                self._said[owner] = now
                log.warning("%s has %d bytes of answers kept long (MAX_KEPT_BYTES %d): its "
                            "new ones are kept RESULT_TTL only", owner[:40],
                            self.bytes[owner], conf.get("MAX_KEPT_BYTES"))
            return False
        self.add(owner, size, until)
        return True


def _resolve(waiting: list[asyncio.Future[None]]) -> None:
    for future in waiting:
        if not future.done():
            future.set_result(None)


# --------------------------------------------------------------------------- in the thread


def _write(rows: list[list[Any]], changes: dict[str, dict[str, Any]]) -> None:
    """One transaction: the rows (new, or written again as they are now) in multi-row
    upserts, then the changes of rows not held in memory."""
    moment = db_datetime()
    for row in rows:
        for i in _TIMES:
            if row[i] is not None:
                row[i] = moment(row[i])
    values, then = [tuple(r) for r in rows], _upsert(connection.vendor)
    if not changes and len(rows) <= rows_per_statement(len(_COLUMNS)):
        # One statement is a transaction of its own: BEGIN and Django's atomic() were a
        # fifth of a commit of a few rows (whose fixed cost is most of what they cost).
        insert_rows(Job._meta.db_table, _COLUMNS, values, then=then)
        return
    with transaction.atomic():
        if rows:
            insert_rows(Job._meta.db_table, _COLUMNS, values, then=then)
        if changes:
            _update(changes, moment)


@functools.cache
def _upsert(vendor: str) -> str:
    """The clause that makes the rows' INSERT an upsert (quoted once per database)."""
    ops = connection.ops
    return (f"ON CONFLICT ({ops.quote_name('key')}) DO UPDATE SET "
            + ", ".join(f"{ops.quote_name(c)} = excluded.{ops.quote_name(c)}"
                        for c in _CHANGING))


def _update(changes: dict[str, dict[str, Any]], moment: Any) -> None:
    """One statement per set of columns changed (placed; answered), run for many keys."""
    by_columns: dict[tuple[str, ...], list[list[Any]]] = {}
    for key, columns in changes.items():
        names = tuple(sorted(columns))
        values = [moment(columns[n]) if _AT[n] in _TIMES and columns[n] is not None
                  else columns[n] for n in names]
        by_columns.setdefault(names, []).append([*values, key])
    ops = connection.ops
    with connection.cursor() as cursor:
        execute, mark = raw_execute(cursor)
        for names, params in by_columns.items():
            sets = ", ".join(f"{ops.quote_name(n)} = {mark}" for n in names)
            sql = (f"UPDATE {ops.quote_name(Job._meta.db_table)} SET {sets} "
                   f"WHERE {ops.quote_name('key')} = {mark}")
            for one in params:
                execute(sql, one)


def _kept_by_owner(now: float) -> list[tuple[str, int, float]]:
    """(owner, bytes, until) of the rows kept past RESULT_TTL, per credential: counted
    again at start, as kept until the last of them expires."""
    from django.db.models import Max, Sum
    from django.db.models.functions import Length

    rows = Job.objects.filter(expires_at__gt=utc(now)).values("owner").annotate(
        size=Sum(Length("answer") + Length("request")), until=Max("expires_at"))
    return [(r["owner"], int(r["size"] or 0), r["until"].timestamp()) for r in rows]


def _prune_done(before: float) -> int:
    """Every row answered before ``before`` (and kept no longer: ``expires_at``),
    PRUNE_BATCH rows a statement (each one short, so that commits get in between)."""
    total = _prune(Job.objects.filter(state=DONE, finished_at__lt=utc(before),
                                      expires_at__isnull=True))
    return total + _prune(Job.objects.filter(expires_at__lt=utc(time.time())))


def _prune(done: Any) -> int:
    total = 0
    while True:
        chosen = done.order_by().values("pk")[:PRUNE_BATCH]
        deleted, _ = Job.objects.filter(pk__in=chosen).delete()
        total += deleted
        if deleted < PRUNE_BATCH:
            return total


def _take_over(process: str, inbox: str, dead: list[str] | None) -> list[Kept]:
    """One transaction: of two processes taking over the same rows, one gets them."""
    from django.db.models import F

    with transaction.atomic():
        rows = Job.objects.exclude(state=DONE).exclude(process=process)
        if dead is not None:
            rows = rows.filter(process__in=dead)
        taken = list(rows.select_for_update(skip_locked=True).order_by("created_at")) \
            if connection.features.has_select_for_update_skip_locked else \
            list(rows.order_by("created_at"))
        Job.objects.filter(pk__in=[j.pk for j in taken]).update(
            process=process, inbox=inbox, restarts=F("restarts") + 1)
        return [Kept(j.key, j.request_id, j.owner, j.command, j.state,
                     protocol.loads_object(j.request), j.worker_id, j.retry_safe,
                     j.restarts + 1, j.created_at.timestamp(), j.deadline.timestamp(),
                     j.inbox, j.not_before.timestamp() if j.not_before else 0.0)
                for j in taken]


def _holders() -> set[str]:
    return set(Job.objects.exclude(state=DONE).values_list("process", flat=True).distinct())


def _seen_since(since: float) -> bool:
    return WorkerSession.objects.filter(last_seen__gte=utc(since)).exists()


def _answered_since(since: float) -> list[tuple[str, str, str]]:
    return list(Job.objects.filter(state=DONE, finished_at__gte=utc(since)).order_by(
        "finished_at").values_list("owner", "request_id", "answer").iterator())


def _unanswered(owner: str, request_id: str) -> bool:
    return Job.objects.filter(owner=owner, request_id=request_id).exclude(
        state=DONE).exists()


def _answer_of(owner: str, request_id: str) -> str | None:
    answer = Job.objects.filter(owner=owner, request_id=request_id, state=DONE).order_by(
        "-finished_at").values_list("answer", flat=True).first()
    return answer or None
