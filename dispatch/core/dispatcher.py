"""The driver of the request table: the I/O around choosing, forwarding and answering.

One :class:`Dispatcher` per broker process. Every rule about a request's life is in
:class:`~dispatch.core.requests.RequestTable`; this class does what the table asks
for (reserve slots in the registry, hand frames to worker sockets, send layer
messages, run timers, answer requesters, record history) and feeds it what
happened. One code path for both registries: with a shared (Redis) registry,
reservations and releases are batched, with the in-process one they run at once.

The dispatcher has its own channel on the layer, its inbox, so any number of broker
processes can share one fleet: a request for a worker held by another process goes
to that process's inbox, and the worker's answer comes back to this one's. What
gathers for one inbox while the previous layer send is under way goes as one layer
message. Within one process nothing is sent over the layer: calls are direct.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import Any, Callable, Iterable, Protocol

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, get_channel_layer

from workers import protocol, tracing
from workers.protocol import ErrorCode

from .. import conf
from ..history import HistoryRecorder, get_recorder
from ..registry import Outcome, Registry, RegistryUnavailable, get_registry
from . import events, inbox, links
from .balancing import Health, Wanted
from .links import WorkerLink
from .liveness import Liveness
from .loops import Batcher, PerLoop
from .metering import meter
from .requests import (Action, Answer, Arm, ArmHedge, CancelOnWorker, Forward, GiveBack,
                       Notify, Request, RequestTable, Reserve, Sink, State, Wake, Watcher)
from .results import results_for

log = logging.getLogger("dispatch.dispatcher")

#: How often requests waiting for a free slot are retried when nothing wakes them.
QUEUE_POLL_SECONDS = 0.05
#: How long stop() waits for its background tasks to end once cancelled.
STOP_WAIT_SECONDS = 2.0


class LocalWorker(Protocol):
    """A worker socket in this process: it has no channel of its own, the dispatcher
    hands it whatever the layer brings for it."""

    @property
    def busy(self) -> int: ...

    async def assign(self, message: dict[str, Any]) -> None: ...

    async def notify(self, message: dict[str, Any]) -> None: ...

    async def kick(self, reason: str, code: int) -> None: ...

    async def cancel(self, key: str, reason: str) -> None: ...

    async def chunk_acked(self, key: str, seq: int) -> None: ...

    async def stop_taking_work(self) -> None: ...

    async def leave(self, reason: str, retry_after: float | None = None) -> None: ...


class Dispatcher:
    """The requests of one broker process, from arrival to answer: the table's I/O."""

    def __init__(self, layer: BaseChannelLayer, registry: Registry,
                 recorder: HistoryRecorder) -> None:
        self.layer = layer
        self.registry = registry
        self.recorder = recorder
        self.process = conf.process_name()
        self.channel = ""
        self.table = RequestTable()
        self.meter = meter
        self.local_workers: dict[str, LocalWorker] = {}  # registered, by connection name
        self.links: set[WorkerLink] = set()  # every worker connection, registered or not
        self._outbox: Batcher[tuple[str, dict[str, Any]]] = Batcher(self._send, "dispatch-send")
        self._intake: Batcher[Request] = Batcher(self._reserve, "dispatch-reserve")
        self._releases: Batcher[Outcome] = Batcher(
            self._release_many, "dispatch-release")
        self.liveness = Liveness(registry, self.process)
        self.results = results_for(registry)
        #: Requests of other processes this one is attached to: its key -> the watcher.
        self.attached: dict[str, Sink] = {}
        self._asks: dict[str, asyncio.Queue[int]] = {}  # token -> what the others found
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = False

    @property
    def stats(self) -> Any:
        return self.table.stats

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
        self.channel = await self.layer.new_channel()
        self._tasks = [asyncio.create_task(inbox.listen(self.layer, self.channel, self.handle,
                                                        "dispatcher", lambda: not self.stopped),
                                           name="dispatch-inbox"),
                       asyncio.create_task(self._queue_loop(), name="dispatch-queue"),
                       asyncio.create_task(self._sweep_loop(), name="dispatch-sweep"),
                       asyncio.create_task(links.watch(self.links), name="dispatch-watch")]
        await self._join_broadcasts()
        await self.recorder.start()
        await self.liveness.start()
        log.debug("dispatcher %s listening on %s", self.process, self.channel)

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: take no new requests, let those in flight finish.

        Waits up to ``grace`` seconds for this process's requests and for the work its
        workers hold for other processes, then tells those workers to go (they
        reconnect elsewhere, or when the broker is back).
        """
        self.table.accepting = False
        for worker in list(self.local_workers.values()):
            await worker.stop_taking_work()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and (
                len(self.table) or any(w.busy for w in self.local_workers.values())):
            await asyncio.sleep(0.05)
        # Each worker is told when to come back, spread so that the fleet's return
        # comes at RECONNECT_RATE registrations a second, not all in the first one.
        leaving = list(self.local_workers.values())
        spread = len(leaving) / conf.get("RECONNECT_RATE")
        for worker in leaving:
            await worker.leave(protocol.SHUTTING_DOWN, round(random.uniform(0, spread), 2))

    async def stop(self) -> None:
        """Answer whatever is still pending, stop the loops, flush history."""
        await self._perform(self.table.stop())
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        # Bounded: a receive cancelled inside redis-py's blocking read now and then
        # keeps waiting for its answer (seen with channels-redis), and shutdown must
        # not wait for it.
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_WAIT_SECONDS)
        for task in stuck:
            log.warning("task %s did not stop when cancelled; leaving it", task.get_name())
        try:
            await self.layer.group_discard(events.INBOXES_GROUP, self.channel)
        except Exception as exc:  # noqa: BLE001 - layer down: membership expires
            log.warning("could not leave the broadcast group: %s", exc)
        await self.liveness.stop()
        await self.recorder.stop()

    async def _join_broadcasts(self) -> None:
        """(Re)join the group every process's inbox is in: once at start, then every
        sweep, so that membership survives a Redis restart."""
        try:
            await self.layer.group_add(events.INBOXES_GROUP, self.channel)
        except Exception as exc:  # noqa: BLE001 - layer down: the next sweep retries
            log.warning("could not join the broadcast group: %s", exc)

    # ------------------------------------------------------------------ entry points

    async def submit(self, command: str, data: dict[str, Any], sink: Sink, *,
                     request_id: str, requester: str, timeout: float | None = None,
                     worker_id: str | None = None, key: str | None = None,
                     owner: str = "", stream: bool = False, priority: int = 0,
                     select: tuple[tuple[str, str], ...] = (), affinity: str | None = None,
                     hedge: bool = False, traceparent: str = "") -> str:
        """Start a request; ``sink.answer`` is called exactly once with its answer (and
        ``sink.event`` with its progress and chunks, if ``stream``).

        ``key`` (default: a new id) names the request inside the broker. It is chosen
        before the call because the answer can arrive before ``submit`` returns.
        """
        key = key or protocol.new_id()
        opened = asyncio.get_running_loop().time()
        span, traceparent = tracing.start_span(f"dispatch {command}", traceparent or None,
                                               command=command, request_id=request_id)
        await self._perform(self.table.submit(Request(
            key, command, data, [Watcher(sink, stream)], request_id, requester,
            opened + (timeout or conf.get("TIMEOUT")), time.time(), opened,
            traceparent=traceparent or "", span=span, target=worker_id, owner=owner,
            priority=priority, select=select, affinity=affinity, hedge=hedge)))
        return key

    def unwatch(self, keys: Iterable[str], sink: Sink) -> None:
        """A watcher left (its connection closed); the requests go on, and their answers
        are kept for it to attach again."""
        self.table.unwatch(keys, sink)
        for key in [k for k, s in self.attached.items() if s is sink]:
            del self.attached[key]

    async def cancel(self, owner: str | None, request_id: str, reason: str) -> int:
        """Cancel the requests of ``owner`` (None: anyone's) with this id, in whichever
        process holds them; returns how many were found."""
        found = self._cancel_here(owner, request_id, reason)
        if found:
            await self._perform(found)
            return 1
        if self.registry.local:
            return 0
        return await self._ask_all("cancel", owner, request_id, reason=reason)

    def _cancel_here(self, owner: str | None, request_id: str, reason: str) -> list[Action]:
        return [a for r in self.table.find(owner, request_id)
                for a in self.table.cancel(r.key, reason)]

    async def attach(self, owner: str, request_id: str, sink: Sink, stream: bool) -> bool:
        """Watch a request of ``owner``: running here or elsewhere (its remaining progress
        and its answer), or finished lately (its kept answer). False: unknown."""
        for request in self.table.find(owner, request_id):
            return self.table.watch(request.key, sink, stream)
        kept = await self.results.get(owner, request_id)
        if kept is not None:
            await sink.answer(protocol.ApiResponse.from_json(kept), kept)
            return True
        if self.registry.local:
            return False
        key = protocol.new_id()
        self.attached[key] = sink
        if await self._ask_all("attach", owner, request_id, first=True, key=key,
                               stream=stream):
            return True
        del self.attached[key]
        kept = await self.results.get(owner, request_id)  # it finished meanwhile
        if kept is not None:
            await sink.answer(protocol.ApiResponse.from_json(kept), kept)
            return True
        return False

    async def status(self, owner: str, request_id: str) -> str | None:
        """"running" (here or in another process), the kept answer (JSON text), or None."""
        if self.table.find(owner, request_id):
            return "running"
        kept = await self.results.get(owner, request_id)
        if kept is not None:
            return kept
        if not self.registry.local and await self._ask_all("status", owner, request_id,
                                                           first=True):
            return "running"
        return None

    async def _ask_all(self, what: str, owner: str | None, request_id: str, *,
                       first: bool = False, wait: float = 1.0, **extra: Any) -> int:
        """Ask every broker process (this one too) about a request; sum what they found
        within ``wait`` seconds (or stop at the first that found it, with ``first``)."""
        token = protocol.new_id()
        replies: asyncio.Queue[int] = asyncio.Queue()
        self._asks[token] = replies
        found = 0
        try:
            await self.layer.group_send(events.INBOXES_GROUP, events.ask(
                what, owner, request_id, self.channel, token, **extra))
            async with asyncio.timeout(wait):
                while True:
                    found += await replies.get()
                    if first and found:
                        break
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - the layer is down: nobody else answers
            log.warning("could not ask the other processes about %s: %s",
                        protocol.quote(request_id), exc)
        finally:
            del self._asks[token]
        return found

    async def unready(self, timeout: float) -> str | None:
        """Why this process cannot route now, or None when it can: a message sent
        through the channel layer must come back to its inbox and be handled (a
        stalled consumer, or a layer that takes messages nobody reads, fails here), and
        the registry must answer."""
        if not self.table.accepting:
            return "shutting down"
        token = protocol.new_id()
        replies: asyncio.Queue[int] = asyncio.Queue()
        self._asks[token] = replies
        try:
            async with asyncio.timeout(timeout):
                await self.layer.send(self.channel, events.asked(token, 1))
                await replies.get()
        except TimeoutError:
            return (f"channel layer: a message to this process's inbox was not handled "
                    f"within {timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return f"channel layer: {type(exc).__name__}: {exc}"
        finally:
            del self._asks[token]
        try:
            async with asyncio.timeout(timeout):
                await self.registry.count()
        except TimeoutError:
            return f"registry: no answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001
            return f"registry: {type(exc).__name__}: {exc}"
        return None

    def add_link(self, link: WorkerLink) -> None:
        """A new worker connection of this process, checked by the watch from now on."""
        self.links.add(link)

    def forget_link(self, link: WorkerLink) -> None:
        self.links.discard(link)
        self.local_workers.pop(link.channel, None)

    def kick(self) -> None:
        """A worker slot may have freed: retry the waiting queue now."""
        if self.table.waiting:
            self._wake.set()

    async def deliver(self, channel: str, message: dict[str, Any]) -> None:
        """Send to a dispatcher's inbox: this one's directly, another's in a batch."""
        if channel == self.channel:
            await self.handle(message)
        else:
            self._outbox.add((channel, message))

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        """Give back a worker's slot: at once in-process, in a batch on a shared registry.

        Raises :class:`RegistryUnavailable` only in the first case; a batch that
        cannot be given back is logged (the slots come back with the worker's entry).
        """
        if self.registry.local:
            await self.registry.release(worker_id, latency_ms=latency_ms, health=health)
        else:
            self._releases.add((worker_id, latency_ms, health))

    async def handle(self, message: dict[str, Any]) -> None:
        """A layer message addressed to this dispatcher (or delivered in-process)."""
        kind = message.get("type")
        if kind == events.REPLY:
            await self._perform(self.table.replied(
                message["key"], message["worker_id"], message["success"], message["data"],
                message["error"], message.get("code"), message.get("latency_ms")))
            self.kick()
        elif kind == events.LOST:
            await self._perform(self.table.lost(
                message["key"], message["worker_id"], message["reason"],
                ErrorCode.of(message.get("code"), ErrorCode.WORKER_LOST)))
        elif kind == events.PROGRESS:
            await self._perform(self.table.progress(message["key"], message["worker_id"],
                                                    message["progress"], message["message"]))
        elif kind == events.CHUNK:
            await self._perform(self.table.chunk(
                message["key"], message["worker_id"], message["seq"], message["data"],
                events.chunk_ack(message["key"], message["worker"], message["seq"])
                | {"inbox": message["ack_to"]}))
        elif kind in (events.CANCEL, events.CHUNK_ACK):
            link = self.local_workers.get(message["worker"])
            if link is not None:
                if kind == events.CANCEL:
                    await link.cancel(message["key"], message["reason"])
                else:
                    await link.chunk_acked(message["key"], message["seq"])
        elif kind == events.ASK:
            await self._on_ask(message)
        elif kind == events.ASKED:
            replies = self._asks.get(message["token"])
            if replies is not None:
                replies.put_nowait(message["found"])
        elif kind == events.WATCHED:
            await self._on_watched(message)
        elif kind == events.FORWARD:
            await self._on_forward(message)
        elif kind == events.NOTIFY:
            for worker in list(self.local_workers.values()):
                await worker.notify(message)
        elif kind == events.KICK:
            target = self.local_workers.get(message["worker"])
            if target is not None:
                await target.kick(message["reason"], message["code"])
        elif kind == events.BATCH:
            for inner in message["messages"]:
                try:
                    await self.handle(inner)
                except Exception:  # one bad message must not lose the rest
                    log.exception("dispatcher failed to handle a %s message", inner.get("type"))
        else:
            log.warning("dispatcher ignored a layer message of type %r", kind)

    # ------------------------------------------------------------------ actions

    async def _perform(self, actions: list[Action]) -> None:
        """Do what the table asked for, in order."""
        for action in actions:
            if isinstance(action, Forward):
                await self._forward(action)
            elif isinstance(action, Answer):
                await self._answer(action)
            elif isinstance(action, Arm):
                request = action.request
                request.timer = asyncio.get_running_loop().call_at(
                    request.deadline, self._timer_fired, self.table.expired, request.key)
            elif isinstance(action, Reserve):
                if self.registry.local:
                    await self._reserve(action.requests)
                else:  # with the others of this moment, in two round trips for all
                    for request in action.requests:
                        self._intake.add(request)
            elif isinstance(action, GiveBack):
                await self._give_back(action.worker_id)
            elif isinstance(action, Notify):
                await self._notify(action)
            elif isinstance(action, CancelOnWorker):
                placement = action.placement
                await self.deliver(placement.inbox, events.cancel(
                    action.request.key, placement.channel, action.reason))
            elif isinstance(action, ArmHedge):
                action.request.hedge_timer = asyncio.get_running_loop().call_later(
                    action.delay, self._timer_fired, self.table.hedge_due, action.request.key)
            elif isinstance(action, Wake):
                self._wake.set()

    async def _reserve(self, batch: list[Request]) -> None:
        """Reserve a slot for each, in one registry call; then tell the table."""
        try:
            reservations = await self.registry.reserve_many([r.wanted() for r in batch])
        except Exception as exc:  # noqa: BLE001 - each of them gets an answer
            self.stats["registry_errors"] += 1
            if not isinstance(exc, RegistryUnavailable):
                log.exception("could not reserve workers for %d request(s)", len(batch))
            await self._perform(self.table.reservation_failed(batch, str(exc)))
            return
        now = asyncio.get_running_loop().time()
        for request, reservation in zip(batch, reservations):
            await self._perform(self.table.reserved(request, reservation, now))

    async def _forward(self, action: Forward) -> None:
        request, worker = action.request, action.worker
        message = events.forward(request.key, request.command, request.data, self.channel,
                                 action.timeout, worker.worker_id, worker.channel,
                                 request.stream, request.traceparent)
        local = self.local_workers.get(worker.channel)
        if local is None:
            await self.deliver(worker.inbox, message)
            return
        try:
            await local.assign(message)
        except Exception as exc:  # noqa: BLE001 - answer, never hang
            log.warning("could not forward request %s to %s: %s", request.request_id,
                        worker.worker_id, exc)
            await self._perform(self.table.failed_on(
                request.key, worker.worker_id, f"{protocol.BROKER_UNAVAILABLE}: {exc}",
                ErrorCode.BROKER_UNAVAILABLE))

    async def _answer(self, action: Answer) -> None:
        """The request's one answer: stop its timer, record it, keep it for re-attach,
        tell whoever watches it."""
        request, response = action.request, action.response
        self._disarm(request)
        now = time.time()
        latency_ms = (now - request.started) * 1000
        self.meter.answered(request.command, response.success, response.code, latency_ms,
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
        self.recorder.record_request(
            request_id=request.request_id, command=request.command,
            worker_id=response.processed_by, success=response.success, error=response.error,
            latency_ms=latency_ms, attempts=request.attempts,
            requester=request.requester, started_at=request.started, finished_at=now,
            workers_lost=request.workers_lost, code=response.code, routing=request.routing,
            placed_at=request.started + (request.placed - request.opened) if request.placed
            else None, traceparent=request.traceparent)
        text = response.to_json()
        self.results.put(request.owner, request.request_id, text)
        for watcher in request.watchers:
            try:
                await watcher.sink.answer(response, text)
            except Exception:  # the watcher is gone; nobody is left to tell
                log.debug("could not deliver the answer to %s", request.requester,
                          exc_info=True)

    async def _notify(self, action: Notify) -> None:
        """Progress or a chunk, to the watchers that asked; a chunk is acknowledged to
        its worker by the first of them that took it (at once if none wants it)."""
        ack, watching = action.ack, [w for w in action.request.watchers if w.stream]
        for watcher in watching:
            await watcher.sink.event(action.request.request_id, action.text,
                                     ack=self._acker(ack) if ack is not None else None,
                                     mergeable=action.mergeable)
            ack = None
        if ack is not None:
            await self._acker(ack)()

    def _acker(self, ack: dict[str, Any]) -> Any:
        inbox = ack.pop("inbox")

        async def send_ack() -> None:
            await self.deliver(inbox, ack)

        return send_ack

    async def _on_ask(self, message: dict[str, Any]) -> None:
        """Another process (or this one) asks about a request by its id."""
        what, owner, request_id = message["what"], message["owner"], message["request_id"]
        if what == "cancel":
            actions = self._cancel_here(owner, request_id, message["reason"])
            await self._perform(actions)
            found = len([a for a in actions if isinstance(a, Answer)])
        elif what == "attach":
            found = 0
            if message["reply_to"] != self.channel:  # the asker looked here itself
                for request in self.table.find(owner, request_id):
                    found = int(self.table.watch(request.key, RemoteSink(
                        self, message["reply_to"], message["key"]), message["stream"]))
        else:  # status
            found = len(self.table.find(owner, request_id))
        await self.deliver(message["reply_to"], events.asked(message["token"], found))

    async def _on_watched(self, message: dict[str, Any]) -> None:
        """An event, or the answer, of a request of another process we are attached to."""
        sink = self.attached.get(message["key"])
        if sink is None:
            return
        if not message["final"]:
            request_id = protocol.loads_object(message["text"])["request_id"]
            await sink.event(request_id, message["text"], mergeable=message["mergeable"])
            return
        del self.attached[message["key"]]
        await sink.answer(protocol.ApiResponse.from_json(message["text"]), message["text"])

    @staticmethod
    def _disarm(request: Request) -> None:
        for timer in (request.timer, request.hedge_timer):
            if timer is not None:
                timer.cancel()
        request.timer = request.hedge_timer = None

    def _timer_fired(self, step: Callable[[str], list[Action]], key: str) -> None:
        """A request's timer (its deadline, its hedge delay): the table's step for it."""
        actions = step(key)
        if actions:
            asyncio.ensure_future(self._perform(actions))

    async def _on_forward(self, message: dict[str, Any]) -> None:
        """Another process chose a worker of this one."""
        worker = self.local_workers.get(message["worker"])
        if worker is not None:
            await worker.assign(message)
        else:  # it left after it was chosen: the requester's process tries another
            await self.deliver(message["reply_to"], events.lost(
                message["key"], message["worker_id"], "connection closed"))

    async def _send(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        """One layer message per destination inbox (the outbox's batch)."""
        by_inbox: dict[str, list[dict[str, Any]]] = {}
        for channel, message in items:
            by_inbox.setdefault(channel, []).append(message)
        await asyncio.gather(*(self._send_one(channel, messages)
                               for channel, messages in by_inbox.items()))

    async def _send_one(self, channel: str, messages: list[dict[str, Any]]) -> None:
        try:
            await self.layer.send(channel, messages[0] if len(messages) == 1
                                  else events.batch(messages))
        except Exception as exc:  # noqa: BLE001 - full, or the backend is down
            full = isinstance(exc, ChannelFull)
            self.stats["channel_full" if full else "layer_errors"] += 1
            log.warning("could not pass %d message(s) on to %s: %s", len(messages), channel,
                        "channel full" if full else exc)
            error, code = ((protocol.BROKER_OVERLOADED, ErrorCode.OVERLOADED) if full else
                           (f"{protocol.BROKER_UNAVAILABLE}: {exc}",
                            ErrorCode.BROKER_UNAVAILABLE))
            for message in messages:
                # A forward that never left is answered now; an answer for another
                # process that could not be sent is lost: that process answers its
                # request when it times out.
                if message["type"] == events.FORWARD:
                    await self._perform(self.table.failed_on(
                        message["key"], message["worker_id"], error, code))

    async def _give_back(self, worker_id: str) -> None:
        """Release a slot taken for a request that never reached its worker."""
        try:
            await self.release(worker_id, latency_ms=None, health=Health.UNKNOWN)
        except RegistryUnavailable:
            self.stats["registry_errors"] += 1  # the slot's entry expires with its heartbeat

    async def _release_many(self, outcomes: list[Outcome]) -> None:
        try:
            await self.registry.release_many(outcomes)
        except RegistryUnavailable as exc:
            self.stats["registry_errors"] += 1
            log.warning("could not give back %d worker slot(s): %s", len(outcomes), exc)
        self.kick()

    async def _queue_loop(self) -> None:
        """Retry queued requests when a slot frees (or every poll, across processes)."""
        while True:
            if self.table.waiting:
                try:
                    await asyncio.wait_for(self._wake.wait(), QUEUE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            batch = self.table.take_waiting()
            try:
                if batch:
                    await self._queue_pass(batch)
            finally:
                self.table.end_pass()  # those that must wait again, back in front
            # Cleared after the pass, so that re-queueing above does not spin the loop;
            # a wake-up lost here costs at most one poll interval.
            self._wake.clear()

    async def _queue_pass(self, batch: list[Request]) -> None:
        """Reserve for the waiting, alike ones (same command and routing) in turn: the
        first of each kind, then the next of each kind that got a slot, and so on. A
        kind whose first finds no slot is not tried further in this pass, so a full
        fleet costs a choice per kind of request, not one per waiting request."""
        kinds: dict[Wanted, deque[Request]] = {}
        for request in batch:
            kinds.setdefault(request.wanted(), deque()).append(request)
        while kinds:
            heads = [alike.popleft() for alike in kinds.values()]
            await self._reserve(heads)
            for head, (kind, alike) in zip(heads, list(kinds.items())):
                if head.state is State.WAITING or not alike:  # no slot: the rest wait too
                    self.table.untried(alike)
                    del kinds[kind]

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.get("HEARTBEAT_INTERVAL"))
            await self._join_broadcasts()
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - Redis down: try again next round
                log.warning("could not check the workers of pending requests: %s", exc)

    async def sweep(self) -> None:
        """Hand back requests whose worker vanished without a word.

        A worker socket reports the requests it held when it closes; but if its whole
        broker process dies, nobody does. Its workers then drop out of the shared
        registry when their heartbeats expire, and this notices.
        """
        placed = self.table.placed()
        if not placed:
            return
        live = await self.registry.channels(p.worker_id for r in placed for p in r.placements)
        for request in placed:
            for p in list(request.placements):
                if live.get(p.worker_id) != p.channel:
                    await self._perform(self.table.lost(request.key, p.worker_id,
                                                        "worker vanished"))


_dispatchers: PerLoop[Dispatcher] = PerLoop(
    lambda: Dispatcher(get_channel_layer(), get_registry(), get_recorder()))

#: The dispatcher of this process (of this event loop), started on first use.
get_dispatcher = _dispatchers.get
#: Stop this loop's dispatcher, if one was started (shutdown, tests).
stop_dispatcher = _dispatchers.stop


class RemoteSink:
    """A watcher in another process: what it is told goes to that process's inbox."""

    def __init__(self, dispatcher: Dispatcher, inbox: str, key: str) -> None:
        self.dispatcher = dispatcher
        self.inbox = inbox
        self.key = key

    async def answer(self, response: protocol.ApiResponse, text: str) -> None:
        await self.dispatcher.deliver(self.inbox, events.watched(self.key, text, final=True))

    async def event(self, request_id: str, text: str, *, ack: Any = None,
                    mergeable: bool = False) -> None:
        await self.dispatcher.deliver(self.inbox, events.watched(self.key, text,
                                                                 mergeable=mergeable))
        if ack is not None:
            await ack()
