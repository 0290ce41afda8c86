"""The driver of the request table: it does what the table asks, and tells it what
happened.

One :class:`Dispatcher` per broker process. Every rule about a request's life is in
:class:`~dispatch.core.requests.RequestTable`; the dispatcher performs the actions
the table returns and feeds it the events that come back. What it drives has a
module each: the traffic between processes (:mod:`.exchange`), the worker slots
and the queue (:mod:`.slots`), the process's worker connections
(:mod:`.connections`), requests by their id (:mod:`.lookup`), the job store
(:mod:`.keeper`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Awaitable, Callable, Iterable

from channels.layers import BaseChannelLayer, get_channel_layer

from workers import protocol, tracing
from workers.protocol import ErrorCode

from .. import conf
from ..errors import LayerFull, LayerUnavailable, RegistryUnavailable
from ..history import HistoryRecorder, get_recorder
from ..loops import PerLoop
from ..registry import Registry, get_registry
from .connections import WorkerConnections
from .events import Cancel, Chunk, ChunkAck, Event, Forward, Lost, Progress, Reply
from .exchange import Exchange
from .liveness import Liveness
from .lookup import Lookup
from .metering import meter
from .handover import Handover
from .keeper import Keeper
from .requests import (Action, Answer, CancelOnWorker, GiveBack, Notify, Request, RequestTable,
                       Reserve, Sink, State, Wake, Watcher)
from .requests import Forward as Place
from .results import results_for
from .slots import Slots
from .timers import Timers, disarm

log = logging.getLogger("dispatch.dispatcher")

#: How long stop() waits for its background tasks to end once cancelled.
STOP_WAIT_SECONDS = 2.0


class Dispatcher:
    """The requests of one broker process, from arrival to answer: the table's I/O."""

    def __init__(self, layer: BaseChannelLayer, registry: Registry,
                 recorder: HistoryRecorder) -> None:
        self.registry = registry
        self.recorder = recorder
        self.process = conf.process_name()
        self.table = RequestTable()
        self.exchange = Exchange(layer, self.table.stats)
        self.exchange.undelivered = self._undelivered
        self.slots = Slots(registry, self.table, self._perform)
        self.workers = WorkerConnections(self.exchange, self.slots, registry, self.process,
                                         self.table.stats)
        self.results = results_for(registry)
        self.keeper = Keeper(self.table, self.results, self._perform, self.process,
                             self.exchange, registry)
        self.workers.adopter = self.keeper.adopt
        self.handover = Handover(self.exchange, self.process)
        self.workers.on_moved = self.handover.moved
        #: Cancel, attach, status by request id, wherever the request is.
        self.lookup = Lookup(self.exchange, self.table, self.keeper.kept_answer,
                             self.results.get, self._perform, registry.local)
        if self.keeper.store is not None:
            self.lookup.stored = self.keeper.store.unanswered
            self.keeper.on_restored = self.lookup.restored
            self.keeper.on_round = self.lookup.look_again
        self.liveness = Liveness(registry, self.process, self.keeper.take_over_dead)
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = False
        #: Stopping with a job store: its requests are handed over (:mod:`.handover`).
        self.handing_over = False
        self._actions: dict[type[Any], Callable[[Any], Awaitable[None]]] = {
            Place: self._forward, Answer: self._answer, Reserve: self._reserve,
            GiveBack: self._give_back, Notify: self._notify,
            CancelOnWorker: self._cancel_on_worker, Wake: self._wake,
            **Timers(self.table, self.keeper.recovery, self._perform).handlers()}
        for kind, handler in ((Reply, self._on_reply), (Lost, self._on_lost),
                              (Progress, self._on_progress), (Chunk, self._on_chunk)):
            self.exchange.on(kind, handler)  # type: ignore[arg-type]

    @property
    def stats(self) -> Counter[str]:
        return self.table.stats

    @property
    def inbox(self) -> str:
        """This process's channel on the layer."""
        return self.exchange.inbox

    @property
    def pending(self) -> int:
        """Requests this process has yet to answer."""
        return len(self.table)

    @property
    def waiting(self) -> int:
        """Of those, the ones waiting for a free slot."""
        return len(self.table.waiting)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._tasks = [await self.exchange.start(lambda: not self.stopped),
                       asyncio.create_task(self.slots.serve_queue(), name="dispatch-queue"),
                       asyncio.create_task(self._look_around(), name="dispatch-sweep"),
                       self.workers.watch()]
        await self.recorder.start()
        await self.liveness.start()
        await self.keeper.start()
        log.debug("dispatcher %s listening on %s", self.process, self.inbox)

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: take no new requests; tell the workers to go (they
        reconnect elsewhere, or when the broker is back).

        With the job store, what is pending is handed over as it is: it stays in the
        store for the next start (running jobs stay with their workers). Without it,
        this waits up to ``grace`` seconds for this process's requests and for the work
        its workers hold for other processes first.
        """
        self.table.accepting = False
        await self.workers.stop_taking_work()
        if self.keeper.store is not None:
            self.handing_over = True
            self.handover.freeze()
            await self.liveness.stop()  # gone: no other process waits for it to come back
            await self.handover.give_away(self.keeper.store, self.registry.local)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0 if self.handing_over else grace)
        while loop.time() < deadline and (len(self.table) or self.workers.busy):
            await asyncio.sleep(0.05)
        await self.workers.send_away()

    async def stop(self) -> None:
        """Stop the loops, flush history; what is still pending stays in the job store
        for the next start (without one, it is answered now)."""
        if self.keeper.store is None:
            await self._perform(self.table.stop())
        self.table.accepting = False
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        # Bounded: a receive cancelled in redis-py's blocking read may keep waiting for
        # its answer (seen with channels-redis); shutdown must not wait for it.
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_WAIT_SECONDS)
        for task in stuck:
            log.warning("task %s did not stop when cancelled; leaving it", task.get_name())
        await self.exchange.leave()
        await self.liveness.stop()
        await self.keeper.stop()
        await self.recorder.stop()

    async def _look_around(self) -> None:
        """Every heartbeat interval: rejoin the broadcast group (it survives a Redis
        restart so), and hand back requests whose workers vanished."""
        while True:
            await asyncio.sleep(conf.get("HEARTBEAT_INTERVAL"))
            await self.exchange.join()
            try:
                await self.slots.sweep()
            except RegistryUnavailable as exc:  # Redis down: the next round tries again
                log.warning("could not check the workers of pending requests: %s", exc)
            except Exception:  # a defect: said, and the rounds go on
                log.exception("checking the workers of pending requests failed")

    # ------------------------------------------------------------------ entry points

    async def submit(self, command: str, data: dict[str, Any], sink: Sink, *,
                     request_id: str, requester: str, timeout: float | None = None,
                     worker_id: str | None = None, key: str | None = None,
                     owner: str = "", stream: bool = False, priority: int = 0,
                     select: tuple[tuple[str, str], ...] = (), affinity: str | None = None,
                     hedge: bool = False, traceparent: str = "", cost: int = 0,
                     not_before: float | None = None, wait_for_workers: bool = False,
                     keep: float = 0.0, task: str = "", replay_of: str = "") -> str:
        """Start a request; ``sink.answer`` is called exactly once with its answer (and
        ``sink.event`` with its progress and chunks, if ``stream``).

        ``key`` (default: a new id) names the request inside the broker. It is chosen
        before the call because the answer can arrive before ``submit`` returns.
        ``not_before`` (unix time) defers it; its timeout counts from then.
        """
        key = key or protocol.new_id()
        opened = asyncio.get_running_loop().time()
        due = opened + max(0.0, not_before - time.time()) if not_before else opened
        span, traceparent = tracing.start_span(f"dispatch {command}", traceparent or None,
                                               command=command, request_id=request_id)
        request = Request(
            key, command, data, [Watcher(sink, stream)], request_id, requester,
            due + (timeout or conf.get("TIMEOUT")), time.time(), opened,
            traceparent=traceparent or "", span=span, target=worker_id, owner=owner,
            priority=priority, select=select, affinity=affinity, hedge=hedge, cost=cost,
            patient_until=self.keeper.patient_until, not_before=due if due > opened else 0.0,
            task=task, keep=keep, replay_of=replay_of, wait_for_workers=wait_for_workers)
        actions = self.table.submit(request)
        if request.state is not State.DONE:  # accepted, not refused at once
            self.keeper.accepted(request)
        await self._perform(actions)
        return key

    def unwatch(self, keys: Iterable[str], sink: Sink, owner: str = "",
                attached: Iterable[str] = ()) -> None:
        """A watcher left (its connection closed): of the requests it sent (``keys``) and
        those of ``owner`` it attached to (request ids). They go on, and their answers
        are kept for it to attach again."""
        keys = [*keys, *(r.key for rid in attached for r in self.table.find(owner, rid))]
        self.table.unwatch(keys, sink)
        self.lookup.unwatch(sink)

    async def unready(self, timeout: float) -> str | None:
        """Why this process cannot route now, or None when it can."""
        if not self.table.accepting:
            return "shutting down"
        return await unready(self.exchange, self.registry, timeout)

    # ------------------------------------------------------------------ events

    async def _on_reply(self, event: Reply) -> None:
        await self._perform(self.table.replied(event.key, event.worker_id, event.success,
                                               event.data, event.error, event.code,
                                               event.latency_ms))
        self.slots.slot_freed()

    async def _on_lost(self, event: Lost) -> None:
        if event.departure and (waiting := self.keeper.recovery.away(
                event.key, event.worker_id, event.departure)):
            await self._perform(waiting)
            return
        await self._perform(self.table.lost(event.key, event.worker_id, event.reason,
                                            ErrorCode.of(event.code, ErrorCode.WORKER_LOST)))

    async def _on_progress(self, event: Progress) -> None:
        await self._perform(self.table.progress(event.key, event.worker_id, event.progress,
                                                event.message))
        request = self.table.requests.get(event.key)
        if request is not None and request.task and request.reported is not None:
            self.keeper.progressed(request)  # a Django task's result object shows it

    async def _on_chunk(self, event: Chunk) -> None:
        ack = (event.ack_to, ChunkAck(event.key, event.connection, event.seq))
        await self._perform(self.table.chunk(event.key, event.worker_id, event.seq,
                                             event.data, ack))

    async def _undelivered(self, events: list[Event], exc: LayerUnavailable) -> None:
        """Events the layer would not take: a forward that never left is answered now;
        an answer for another process is lost (that process answers its request when it
        times out)."""
        error, code = ((protocol.BROKER_OVERLOADED, ErrorCode.OVERLOADED)
                       if isinstance(exc, LayerFull) else
                       (f"{protocol.BROKER_UNAVAILABLE}: {exc}", ErrorCode.BROKER_UNAVAILABLE))
        for event in events:
            if isinstance(event, Forward):
                await self._perform(self.table.failed_on(event.key, event.worker_id, error,
                                                         code))

    # ------------------------------------------------------------------ actions

    async def _perform(self, actions: list[Action]) -> None:
        """Do what the table asked for, in order."""
        for action in actions:
            await self._actions[type(action)](action)

    async def _forward(self, action: Place) -> None:
        request, worker = action.request, action.worker
        forward = Forward(request.key, request.command, request.data, self.inbox, action.timeout,
                          worker.worker_id, worker.connection, request.stream, request.traceparent)
        self.keeper.placed(request, worker.worker_id)
        if request.task:  # a Django task: task_started
            tell_watchers(request, None)
        if request.retry_safe or not self.keeper.after_commit(
                lambda: self._deliver(request, worker, forward)):
            await self._deliver(request, worker, forward)

    async def _deliver(self, request: Request, worker: Any, forward: Forward) -> None:
        try:
            await self.exchange.deliver(worker.inbox, forward)
        except Exception as exc:  # noqa: BLE001 - a worker of this process: answer, never hang
            log.warning("could not forward %s to %s: %s", request.request_id, worker.worker_id, exc)
            await self._perform(self.table.failed_on(
                request.key, worker.worker_id, f"{protocol.BROKER_UNAVAILABLE}: {exc}",
                ErrorCode.BROKER_UNAVAILABLE))

    async def _answer(self, action: Answer) -> None:
        """The request's one answer: stop its timer, record it, keep it for re-attach,
        tell whoever watches it."""
        request, response = action.request, action.response
        disarm(request)
        now = time.time()
        latency_ms = (now - request.started) * 1000
        record(self.recorder, request, response, now, latency_ms)
        text = response.to_json()
        self.results.put(request.owner, request.request_id, text)
        self.keeper.answered(request, text, now, response.code)
        if request.task:  # a Django task: task_finished
            tell_watchers(request, response)
        for watcher in request.watchers:
            try:
                await watcher.sink.answer(response, text)
            except Exception:  # noqa: BLE001 - the watcher is gone; nobody is left to tell
                log.debug("could not deliver the answer to %s", request.requester,
                          exc_info=True)

    async def _notify(self, action: Notify) -> None:
        """Progress or a chunk, to the watchers that asked; a chunk is acknowledged to
        its worker by the first of them that took it (at once if none wants it)."""
        ack = self._acker(*action.ack) if action.ack is not None else None
        for watcher in [w for w in action.request.watchers if w.stream]:
            await watcher.sink.event(action.request.request_id, action.text, ack=ack,
                                     mergeable=action.mergeable)
            ack = None
        if ack is not None:
            await ack()

    def _acker(self, to: str, ack: ChunkAck) -> Callable[[], Awaitable[None]]:
        async def send_ack() -> None:
            await self.exchange.deliver(to, ack)

        return send_ack

    async def _reserve(self, action: Reserve) -> None:
        await self.slots.reserve(action.requests)

    async def _give_back(self, action: GiveBack) -> None:
        await self.slots.give_back(action.worker_id)

    async def _cancel_on_worker(self, action: CancelOnWorker) -> None:
        placement = action.placement
        await self.exchange.deliver(placement.inbox, Cancel(
            action.request.key, placement.connection, action.reason))

    async def _wake(self, action: Wake) -> None:
        self.slots.wake()


async def unready(exchange: Exchange, registry: Registry, timeout: float) -> str | None:
    """Why a process cannot route (None: it can): an event sent through the channel
    layer must come back to its inbox and be handled, and the registry must answer."""
    reason = await exchange.round_trip(timeout)
    if reason is not None:
        return reason
    try:
        async with asyncio.timeout(timeout):
            await registry.count()
    except TimeoutError:
        return f"registry: no answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return f"registry: {type(exc).__name__}: {exc}"
    return None


def record(recorder: HistoryRecorder, request: Request, response: protocol.ApiResponse,
           now: float, latency_ms: float) -> None:
    """A request's answer in the meter, its trace, the debug log and the history."""
    meter.answered(request.command, response.success, response.code, latency_ms,
                   attempts=request.attempts, workers_lost=request.workers_lost,
                   hedged=request.hedged, error=response.error,
                   worker_id=response.processed_by, request_id=request.request_id)
    tracing.end_span(request.span, response.success, response.code,
                     worker_id=response.processed_by, attempts=request.attempts)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request %s (%s) %s in %.1f ms by %s%s", protocol.quote(request.request_id),
                  request.command, "answered" if response.success
                  else f"failed ({response.code})", latency_ms, response.processed_by,
                  f" trace {request.traceparent}" if request.traceparent else "")
    recorder.record_request(
        request_id=request.request_id, command=request.command,
        worker_id=response.processed_by, success=response.success, error=response.error,
        latency_ms=latency_ms, attempts=request.attempts,
        requester=request.requester, started_at=request.started, finished_at=now,
        workers_lost=request.workers_lost, code=response.code, routing=request.routing,
        placed_at=request.started + (request.placed - request.opened) if request.placed
        else None, traceparent=request.traceparent)


#: Told of each Django task's job as it is given to a worker (no answer yet) and as it is
#: answered: :mod:`dispatch.tasks.signals` installs itself here when the broker's ASGI
#: application loads.
task_watchers: list[Callable[[Request, protocol.ApiResponse | None], None]] = []


def tell_watchers(request: Request, response: protocol.ApiResponse | None) -> None:
    for watcher in task_watchers:
        watcher(request, response)


_dispatchers: PerLoop[Dispatcher] = PerLoop(
    lambda: Dispatcher(get_channel_layer(), get_registry(), get_recorder()))

#: The dispatcher of this process (of this event loop), started on first use.
get_dispatcher = _dispatchers.get
#: Stop this loop's dispatcher, if one was started (shutdown, tests).
stop_dispatcher = _dispatchers.stop
