"""What the dispatcher tells the job store, and what comes back from it.

The dispatcher calls :meth:`Keeper.accepted`, :meth:`~Keeper.placed` and
:meth:`~Keeper.answered` as a request goes (none awaits: the store commits in the
background). Requests are read back from the store when a process starts (those an
earlier run left), when another process hands its requests over as it stops
(:class:`~.events.Gone`), and when one has been dead for two liveness rounds
(kill -9: :meth:`Keeper.take_over_dead`). A request that was running is adopted
where its worker is, which may be another process: it is asked (:class:`Adopt`), or
it says so when the worker registers there (:class:`Holding`). With ``JOB_STORE``
off, all of this does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Awaitable, Callable

from .. import conf
from ..errors import LayerUnavailable, RegistryUnavailable
from ..registry import Registry, WorkerEntry
from .events import Adopt, Adopted, Forward, Gone, Holding, Moved
from .exchange import Exchange
from .recovery import Recovery
from .requests import Action, Request, RequestTable
from .results import Results
from .store import JobStore, Kept

log = logging.getLogger("dispatch.keeper")

Perform = Callable[[list[Action]], Awaitable[None]]
#: Seconds a request that finds no worker waits for the fleet of a process that stops.
FLEET_MOVING = 10.0


class Keeper:
    """The job store's side of one process's dispatcher."""

    def __init__(self, table: RequestTable, results: Results, perform: Perform,
                 process: str, exchange: Exchange, registry: Registry) -> None:
        self.store = JobStore(process) if conf.get("JOB_STORE") else None
        self.recovery = Recovery(table)
        self.results = results
        self.exchange = exchange
        self.registry = registry
        self.process = process
        self._perform = perform
        #: Event-loop time until which a new request that finds no worker waits for one:
        #: a fleet is coming back after a restart, and none has registered yet (0: none
        #: is expected, or one is back).
        self.patient_until = 0.0
        self._missing: set[str] = set()  # processes with rows, not alive last round
        self._later: set[asyncio.Task[None]] = set()  # what waits for a commit
        #: Told of each request taken over (someone may wait to attach to it).
        self.on_restored: Callable[[Request], None] | None = None
        #: Called at the end of each liveness round.
        self.on_round: Callable[[], Awaitable[None]] | None = None
        for kind, handler in ((Gone, self._on_gone), (Holding, self._on_holding),
                              (Adopted, self._on_adopted)):
            exchange.on(kind, handler)  # type: ignore[arg-type]

        #: What the dispatcher tells of each request (the store's own methods: no layer
        #: between them on every request's path; nothing without a store).
        self.accepted: Callable[[Request], None] = \
            self.store.accepted if self.store is not None else _nothing
        self.placed: Callable[[Request, str], None] = \
            self.store.placed if self.store is not None else _nothing
        self.answered: Callable[[Request, str, float, str | None], None] = \
            self.store.answered if self.store is not None else _nothing
        self.progressed: Callable[[Request], None] = \
            self.store.progressed if self.store is not None else _nothing

    def after_commit(self, then: Callable[[], Awaitable[None]]) -> bool:
        """Run ``then()`` once what was told so far is committed; False without a store.

        For a job that must not run twice: its worker gets it once its row says where it
        runs, so that a crash cannot forget a job that runs (and a requester send it
        again). One commit interval later, holding up nothing else meanwhile."""
        if self.store is None:
            return False

        async def when_kept() -> None:
            await self.store.committed()  # type: ignore[union-attr]
            await then()

        task = asyncio.ensure_future(when_kept())
        self._later.add(task)
        task.add_done_callback(self._later.discard)
        return True

    def committed(self) -> asyncio.Future[None]:
        """Done once what was accepted so far cannot be lost (at once without a store)."""
        if self.store is not None:
            return self.store.committed()
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def kept_answer(self, owner: str, request_id: str) -> str | None:
        """The answer kept for a request (memory or Redis first, then the store)."""
        text = await self.results.get(owner, request_id)
        if text is None and self.store is not None:
            text = await self.store.kept(owner, request_id)
        return text

    # ------------------------------------------------------------------ reading back

    async def start(self) -> None:
        """Alone (the embedded default), serve again what any earlier run left."""
        if self.store is None:
            return
        self.store.inbox = self.exchange.inbox
        await self.store.start()
        if not self.registry.local:
            return  # in a cluster, rows are taken from processes known to be gone
        for owner, request_id, answer in await self.store.answered_lately():
            self.results.put(owner, request_id, answer)  # a requester may come back for it
        kept = await self.store.take_over(None)
        if kept or await self.store.had_workers_lately(conf.get("ADOPT_GRACE")):
            self.patient_until = asyncio.get_running_loop().time() + conf.get("ADOPT_GRACE")
        await self._serve_again(kept)

    async def take_over_dead(self, live: set[str]) -> None:
        """A liveness round: take over the rows of processes not alive this round nor
        the one before (a moment's absence, as when Redis restarts, is no death)."""
        if self.store is None:
            return
        missing = await self.store.holders() - live - {self.process}
        dead, self._missing = missing & self._missing, missing
        if dead:
            log.warning("taking over the requests of stopped broker process(es): %s",
                        ", ".join(sorted(dead)))
            await self._serve_again(await self.store.take_over(sorted(dead)))
        if self.on_round is not None:  # all of this runs apart from the beat of life
            await self.on_round()

    async def _on_gone(self, event: Gone) -> None:
        """Another process stops: its workers are on their way (here, or to another), so
        a request that finds none waits a moment for them instead of failing
        no_workers; and its requests are taken over."""
        if self.store is not None and event.process != self.process:
            until = asyncio.get_running_loop().time() + min(conf.get("ADOPT_GRACE"),
                                                            FLEET_MOVING)
            self.patient_until = max(self.patient_until, until)
            for request in self.recovery.table.requests.values():  # those already here too
                request.patient_until = max(request.patient_until, until)
            await self._serve_again(await self.store.take_over([event.process]),
                                    leaving=event.process)

    async def _serve_again(self, kept: list[Kept], leaving: str = "") -> None:
        """Hold ``kept`` again; ask the workers of those that ran to adopt them where
        they are (but at the ``leaving`` process: it sends them away, and they report
        their jobs where they register next)."""
        if not kept:
            return
        log.warning("job store: request(s) taken over: %d (running: %d)", len(kept),
                    sum(k.state == "running" for k in kept))
        now = asyncio.get_running_loop().time()
        awaited: dict[str, list[Request]] = defaultdict(list)
        for row in kept:
            request = request_from(row)
            running_on = row.worker_id if row.state == "running" else None
            await self._perform(self.recovery.restore(request, running_on, now,
                                                      row.retry_safe))
            if self.on_restored is not None:
                self.on_restored(request)
            if running_on:
                awaited[running_on].append(request)
        for old in {row.inbox for row in kept if row.inbox}:  # answers for them: here
            await self._tell_all(Moved(old, self.exchange.inbox))
        for worker_id, requests in awaited.items():
            await self._ask_worker(worker_id, requests, leaving)

    async def _ask_worker(self, worker_id: str, requests: list[Request], leaving: str
                          ) -> None:
        """Where the worker is registered now (here or elsewhere), ask it to adopt."""
        try:
            entry = await self.registry.get(worker_id)
        except RegistryUnavailable:
            entry = None  # it reports them when it registers again
        if entry is not None and entry.process != leaving:
            for request in requests:
                await self.exchange.deliver(entry.inbox, adopt(request, entry,
                                                               self.exchange.inbox))

    async def _tell_all(self, event: Moved) -> None:
        try:
            await self.exchange.broadcast(event)
        except LayerUnavailable as exc:
            log.warning("could not tell the other processes: %s", exc)

    # ------------------------------------------------------------------ adoption

    async def adopt(self, entry: WorkerEntry, reported: list[str]) -> list[Forward]:
        """A worker registers here: of the requests of this process that wait for it,
        those it reports (it went on with them) are placed on it again, as the forwards
        it would have had; those it does not, it has lost. What it reports that this
        process does not hold, the others are told about (they may)."""
        self.patient_until = 0.0  # the fleet is coming back: "no worker" means it again
        held, lost, forwards = set(reported), [], []
        now = asyncio.get_running_loop().time()
        moved = self.recovery.reported(entry.worker_id, entry.connection, held)
        for request in [*self.recovery.awaited(entry.worker_id), *moved]:
            if request.key not in held:
                request.lost_because = (
                    "its worker came back without it: it never reached the worker, or it "
                    "finished just before the broker stopped and its answer was lost with it")
                lost.append(request.key)
                continue
            self.recovery.adopt(request, entry.worker_id, entry.connection, entry.inbox)
            forwards.append(Forward(request.key, request.command, request.data,
                                    self.exchange.inbox,
                                    max(0.001, request.deadline - now), entry.worker_id,
                                    entry.connection, request.stream, request.traceparent))
        for key in lost:
            await self._perform(self.recovery.not_back(key))
        others = sorted(held - {f.key for f in forwards})
        if others and not self.registry.local:
            try:
                await self.exchange.broadcast(Holding(entry.worker_id, entry.connection,
                                                      entry.inbox, others))
            except LayerUnavailable as exc:
                log.warning("could not ask who holds the jobs of worker %s: %s",
                            entry.worker_id, exc)
        return forwards

    async def _on_holding(self, event: Holding) -> None:
        keys = set(event.keys)
        for request in [*self.recovery.awaited(event.worker_id),
                        *self.recovery.reported(event.worker_id, event.connection, keys)]:
            if request.key in keys:
                await self.exchange.deliver(event.inbox, Adopt(
                    request.key, event.worker_id, event.connection, self.exchange.inbox,
                    request.command, time_left(request), request.stream))

    async def _on_adopted(self, event: Adopted) -> None:
        request = self.recovery.waiting_for(event.key, event.worker_id)
        if request is None:
            [request] = self.recovery.reported(event.worker_id, event.connection,
                                               {event.key}) or [None]
        if request is None:
            return
        if event.held:
            self.recovery.adopt(request, event.worker_id, event.connection, event.inbox)
        else:
            request.lost_because = ("its worker, still connected, does not hold it: it never "
                                    "reached the worker, or it finished over a minute before")
            await self._perform(self.recovery.not_back(event.key))

    async def stop(self) -> None:
        if self.store is not None:
            await self.store.stop()


def _nothing(*_args: object) -> None:
    pass


def adopt(request: Request, entry: WorkerEntry, reply_to: str) -> Adopt:
    return Adopt(request.key, entry.worker_id, entry.connection, reply_to, request.command,
                 time_left(request), request.stream)


def time_left(request: Request) -> float:
    return max(0.001, request.deadline - asyncio.get_running_loop().time())


def request_from(row: Kept) -> Request:
    """A request as it was accepted, from its row; nobody watches it until someone
    attaches (its answer is kept for them)."""
    now, loop_now = time.time(), asyncio.get_running_loop().time()
    body = row.request
    return Request(
        row.key, row.command, body.get("data") or {}, [], row.request_id,
        str(body.get("requester") or ""), loop_now + (row.deadline - now), row.created_at,
        loop_now - (now - row.created_at), traceparent=str(body.get("traceparent") or ""),
        target=body.get("target"), owner=row.owner, priority=int(body.get("priority") or 0),
        select=tuple(tuple(p) for p in body.get("select") or ()),  # type: ignore[misc]
        affinity=body.get("affinity"), hedge=bool(body.get("hedge")),
        not_before=loop_now + (row.not_before - now) if row.not_before > now else 0.0,
        task=str(body.get("task") or ""), keep=float(body.get("keep") or 0.0),
        replay_of=str(body.get("replay_of") or ""),
        wait_for_workers=bool(body.get("wait_for_workers")))
