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
import logging
import time
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connection, transaction

from workers import protocol

from .. import conf
from ..history import SEEN_EVERY
from ..dbthread import DbThread, db_datetime, insert_rows, raw_execute, utc
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
            "finished_at", "answer")
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


def payload(request: Request) -> str:
    """What a row keeps of a request beside its columns: enough to run it again."""
    return protocol.dumps({
        "data": request.data, "requester": request.requester, "stream": request.stream,
        "priority": request.priority, "select": [list(p) for p in request.select],
        "affinity": request.affinity, "hedge": request.hedge, "target": request.target,
        "traceparent": request.traceparent})


class JobStore:
    """Rows of one process's requests, written in commits a few milliseconds apart."""

    def __init__(self, process: str) -> None:
        self.process = process
        self.inbox = ""  # this process's channel (set once the exchange has one)
        self._new: dict[str, list[Any]] = {}  # key -> the row to insert (column order)
        self._changes: dict[str, dict[str, Any]] = {}  # key -> columns to update
        self._waiting: list[asyncio.Future[None]] = []  # resolved by the next commit
        self._dirty = asyncio.Event()
        self._thread = DbThread("job-store")
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self.commits = 0

    # ------------------------------------------------------------------ on the loop

    def accepted(self, request: Request) -> None:
        self._new[request.key] = [
            request.key, request.request_id, request.owner[:40], request.command[:200], QUEUED,
            payload(request), "", True, self.process[:200], self.inbox, 0, request.started,
            request.started + (request.deadline - request.opened), None, ""]
        self._dirty.set()

    def placed(self, request: Request, worker_id: str) -> None:
        self._change(request.key, state=RUNNING, worker_id=worker_id,
                     retry_safe=request.retry_safe)

    def answered(self, request: Request, text: str, when: float) -> None:
        self._change(request.key, state=DONE, answer=text, finished_at=when)

    def _change(self, key: str, **columns: Any) -> None:
        row = self._new.get(key)
        if row is not None:  # not written yet: it will be written as it is now
            for name, value in columns.items():
                row[_COLUMNS.index(name)] = value
        else:
            self._changes.setdefault(key, {}).update(columns)
        self._dirty.set()

    def committed(self) -> asyncio.Future[None]:
        """Done once everything told so far is in the database."""
        future = asyncio.get_running_loop().create_future()
        if not self._new and not self._changes:
            future.set_result(None)
        else:
            self._waiting.append(future)
        return future

    @property
    def pending(self) -> int:
        return len(self._new) + len(self._changes)

    # ------------------------------------------------------------------ writing

    async def start(self) -> None:
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
            await self._dirty.wait()
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
        new, changes, waiting = self._new, self._changes, self._waiting
        self._new, self._changes, self._waiting = {}, {}, []
        self._dirty.clear()
        if not new and not changes:
            _resolve(waiting)
            return
        try:
            await self._thread.run(_write, list(new.values()), changes)
        except BaseException:
            # Back in front of what came meanwhile (a change of a row written later
            # applies to that row): tried again at the next commit.
            new.update(self._new)
            for key, columns in self._changes.items():
                if key in new:
                    for name, value in columns.items():
                        new[key][_COLUMNS.index(name)] = value
                else:
                    changes.setdefault(key, {}).update(columns)
            self._new, self._changes, self._waiting = new, changes, waiting + self._waiting
            self._dirty.set()
            raise
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

    async def kept(self, owner: str, request_id: str) -> str | None:
        """The answer of a request answered lately (within RESULT_TTL), if any."""
        return await self._thread.run(_answer_of, owner, request_id)


def _resolve(waiting: list[asyncio.Future[None]]) -> None:
    for future in waiting:
        if not future.done():
            future.set_result(None)


# --------------------------------------------------------------------------- in the thread


def _write(new: list[list[Any]], changes: dict[str, dict[str, Any]]) -> None:
    moment = db_datetime()
    times = (_COLUMNS.index("created_at"), _COLUMNS.index("deadline"),
             _COLUMNS.index("finished_at"))
    rows = []
    for row in new:
        for i in times:
            if row[i] is not None:
                row[i] = moment(row[i])
        rows.append(tuple(row))
    with transaction.atomic():
        if rows:
            insert_rows(Job._meta.db_table, _COLUMNS, rows)
        if changes:
            _update(changes, moment)


def _update(changes: dict[str, dict[str, Any]], moment: Any) -> None:
    """One statement per set of columns changed (placed; answered), run for many keys."""
    by_columns: dict[tuple[str, ...], list[list[Any]]] = {}
    for key, columns in changes.items():
        names = tuple(sorted(columns))
        values = [moment(columns[n]) if n == "finished_at" else columns[n] for n in names]
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


def _prune_done(before: float) -> int:
    done = Job.objects.filter(state=DONE, finished_at__lt=utc(before))
    chosen = done.order_by().values("pk")[:PRUNE_BATCH]
    deleted, _ = Job.objects.filter(pk__in=chosen).delete()
    return deleted


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
                     j.inbox) for j in taken]


def _holders() -> set[str]:
    return set(Job.objects.exclude(state=DONE).values_list("process", flat=True).distinct())


def _seen_since(since: float) -> bool:
    return WorkerSession.objects.filter(last_seen__gte=utc(since)).exists()


def _answered_since(since: float) -> list[tuple[str, str, str]]:
    return list(Job.objects.filter(state=DONE, finished_at__gte=utc(since)).order_by(
        "finished_at").values_list("owner", "request_id", "answer").iterator())


def _answer_of(owner: str, request_id: str) -> str | None:
    answer = Job.objects.filter(owner=owner, request_id=request_id, state=DONE).order_by(
        "-finished_at").values_list("answer", flat=True).first()
    return answer or None
