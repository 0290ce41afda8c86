"""Forwarding: choose a worker, reserve its slot, wait, fail over, answer once.

One :class:`Dispatcher` per broker process owns every request that entered
through this process (requester sockets and the control API). It has its own
channel on the layer, its inbox, so any number of broker processes can share one
fleet: requests for a worker held by another process go to that process's inbox,
and the worker's answer comes back to this one's. Every request ends in exactly one
call of its ``respond`` callback: the worker's answer, or an explicit error.

Between processes, everything travels in batches: what gathers for one inbox
while the previous layer send is under way goes as one layer message, and with a
shared (Redis) registry, slots are reserved and given back many at a time. Within
one process nothing is batched, nor sent over the layer: calls are direct.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, get_channel_layer

from workers import protocol
from workers.protocol import ApiResponse

from . import conf, events, layer
from .history import HistoryRecorder, get_recorder
from .liveness import Liveness
from .loops import Batcher, PerLoop
from .registry import Registry, RegistryUnavailable, Reservation, WorkerEntry, get_registry

log = logging.getLogger("dispatch.forwarding")

Respond = Callable[[ApiResponse], Awaitable[None]]

#: How often requests waiting for a free slot are retried when nothing wakes them.
QUEUE_POLL_SECONDS = 0.05
#: How long stop() waits for its background tasks to end once cancelled.
STOP_WAIT_SECONDS = 2.0


class LocalWorker(Protocol):
    """A worker consumer in this process: it has no channel of its own, the dispatcher
    hands it whatever the layer brings for it."""

    @property
    def busy(self) -> int: ...

    async def assign(self, message: dict[str, Any]) -> None: ...

    async def notify(self, message: dict[str, Any]) -> None: ...

    async def kick(self, reason: str, code: int) -> None: ...

    async def stop_taking_work(self) -> None: ...

    async def leave(self, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class Pending:
    """A request this process has yet to answer."""

    key: str
    command: str
    data: dict[str, Any]
    respond: Respond
    request_id: str
    requester: str
    deadline: float  # event-loop time
    started: float = field(default_factory=time.time)
    target: str | None = None  # a worker chosen by the caller (broker -> worker `send`)
    worker_id: str | None = None  # the worker it is with now
    worker_channel: str = ""  # that worker's consumer, to notice a reconnect elsewhere
    retry_safe: bool = True  # False: the worker said this command must not run twice
    lost_because: str = ""  # why its last worker was lost, for the error text
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None


class Dispatcher:
    """The requests of one broker process, from arrival to answer."""

    def __init__(self, layer: BaseChannelLayer, registry: Registry,
                 recorder: HistoryRecorder) -> None:
        self.layer = layer
        self.registry = registry
        self.recorder = recorder
        self.process = conf.process_name()
        self.channel = ""
        self.pending: dict[str, Pending] = {}
        self.waiting: deque[Pending] = deque()
        self.local_workers: dict[str, LocalWorker] = {}  # by consumer channel
        self._outbox: Batcher[tuple[str, dict[str, Any]]] = Batcher(self._send, "dispatch-send")
        self._intake: Batcher[Pending] = Batcher(self._assign, "dispatch-reserve")
        self._releases: Batcher[tuple[str, float | None, bool]] = Batcher(
            self._release_many, "dispatch-release")
        self.liveness = Liveness(registry, self.process)
        self.stats: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.accepting = True
        self.stopped = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self.channel = await self.layer.new_channel()
        self._tasks = [asyncio.create_task(layer.listen(self.layer, self.channel, self.handle,
                                                        "dispatcher", lambda: not self.stopped),
                                           name="dispatch-inbox"),
                       asyncio.create_task(self._queue_loop(), name="dispatch-queue"),
                       asyncio.create_task(self._sweep_loop(), name="dispatch-sweep")]
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
        self.accepting = False
        for worker in list(self.local_workers.values()):
            await worker.stop_taking_work()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and (
                self.pending or any(w.busy for w in self.local_workers.values())):
            await asyncio.sleep(0.05)
        for worker in list(self.local_workers.values()):
            await worker.leave(protocol.SHUTTING_DOWN)

    async def stop(self) -> None:
        """Answer whatever is still pending, stop the loops, flush history."""
        for pending in list(self.pending.values()):
            await self._finish(pending, ApiResponse.failure(pending.request_id,
                                                            protocol.SHUTTING_DOWN))
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

    async def submit(self, command: str, data: dict[str, Any], respond: Respond, *,
                     request_id: str, requester: str, timeout: float | None = None,
                     worker_id: str | None = None, key: str | None = None) -> str:
        """Start a request; ``respond`` is called exactly once with its answer.

        ``key`` (default: a new id) names the request inside the broker; the caller
        may pass it to :meth:`abandon`. It is chosen before the call because the
        answer can arrive before ``submit`` returns (no worker, say).
        """
        key = key or protocol.new_id()
        if not self.accepting:
            await respond(ApiResponse.failure(request_id, protocol.SHUTTING_DOWN))
            return key
        loop = asyncio.get_running_loop()
        seconds = timeout or conf.get("TIMEOUT")
        pending = Pending(key, command, data, respond, request_id, requester,
                          deadline=loop.time() + seconds, target=worker_id)
        pending.timer = loop.call_later(seconds, self._expire, key)
        self.pending[key] = pending
        self.stats["submitted"] += 1
        if self.registry.local:
            await self._assign([pending])
        else:  # reserved with the others of this moment, in two round trips for all
            self._intake.add(pending)
        return key

    def abandon(self, keys: list[str]) -> None:
        """Forget requests whose requester left; their late answers will be dropped."""
        for key in keys:
            pending = self.pending.pop(key, None)
            if pending is not None and pending.timer is not None:
                pending.timer.cancel()

    def kick(self) -> None:
        """A worker slot may have freed: retry the waiting queue now."""
        if self.waiting:
            self._wake.set()

    async def deliver(self, channel: str, message: dict[str, Any]) -> None:
        """Send to a dispatcher's inbox: this one's directly, another's in a batch."""
        if channel == self.channel:
            await self.handle(message)
        else:
            self._outbox.add((channel, message))

    async def release(self, worker_id: str, *, latency_ms: float | None, ok: bool) -> None:
        """Give back a worker's slot: at once in-process, in a batch on a shared registry.

        Raises :class:`RegistryUnavailable` only in the first case; a batch that
        cannot be given back is logged (the slots come back with the worker's entry).
        """
        if self.registry.local:
            await self.registry.release(worker_id, latency_ms=latency_ms, ok=ok)
        else:
            self._releases.add((worker_id, latency_ms, ok))

    async def handle(self, message: dict[str, Any]) -> None:
        """A layer message addressed to this dispatcher (or delivered in-process)."""
        kind = message.get("type")
        if kind == events.REPLY:
            await self._on_reply(message)
        elif kind == events.LOST:
            await self._on_lost(message)
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

    # ------------------------------------------------------------------ assigning

    async def _assign(self, batch: list[Pending]) -> None:
        """Reserve a worker for each request and forward; or queue, or answer with why not.

        A lost worker has left the registry by now; if it is back (it reconnected,
        perhaps to another broker process) it is as good a choice as any.
        """
        batch = [p for p in batch if p.key in self.pending]  # not timed out meanwhile
        try:
            reservations = await self.registry.reserve_many(
                [(p.command, p.target) for p in batch])
        except Exception as exc:  # noqa: BLE001 - each of them gets an answer
            if not isinstance(exc, RegistryUnavailable):
                log.exception("could not reserve workers for %d request(s)", len(batch))
            for pending in batch:
                await self._fail(pending, f"{protocol.BROKER_UNAVAILABLE}: {exc}")
            return
        for pending, reservation in zip(batch, reservations):
            await self._place(pending, reservation)

    async def _place(self, pending: Pending, reservation: Reservation) -> None:
        if pending.key not in self.pending:  # answered (timed out) while reserving
            if reservation.worker is not None:
                await self._give_back(reservation.worker.worker_id)
            return
        if reservation.worker is not None:
            await self._forward(pending, reservation.worker)
        elif reservation.capable:
            await self._enqueue(pending)
        else:
            await self._fail(pending, self._unavailable_reason(pending))

    def _unavailable_reason(self, pending: Pending) -> str:
        lost = f"{protocol.WORKER_LOST} ({pending.lost_because})"
        if pending.target is not None:
            return lost if pending.attempts else f"Unknown worker '{pending.target}'"
        if pending.attempts:
            return f"{lost} and no other worker offers '{pending.command}'"
        return protocol.NO_WORKERS

    async def _enqueue(self, pending: Pending) -> None:
        if len(self.waiting) >= conf.get("QUEUE_LIMIT"):
            self.stats["queue_full"] += 1
            await self._fail(pending, protocol.ALL_BUSY)
            return
        self.waiting.append(pending)
        self._wake.set()

    async def _forward(self, pending: Pending, worker: WorkerEntry) -> None:
        pending.worker_id = worker.worker_id
        pending.worker_channel = worker.channel
        pending.retry_safe = pending.command not in worker.no_retry
        pending.attempts += 1
        remaining = max(0.001, pending.deadline - asyncio.get_running_loop().time())
        message = events.forward(pending.key, pending.command, pending.data, self.channel,
                                 remaining, worker.worker_id, worker.channel)
        local = self.local_workers.get(worker.channel)
        if local is None:
            await self.deliver(worker.inbox, message)
            return
        try:
            await local.assign(message)
        except Exception as exc:  # noqa: BLE001 - answer, never hang
            log.warning("could not forward request %s to %s: %s", pending.request_id,
                        worker.worker_id, exc)
            await self._give_back(worker.worker_id)
            await self._fail(pending, f"{protocol.BROKER_UNAVAILABLE}: {exc}")

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
            self.stats["channel_full"] += full
            log.warning("could not pass %d message(s) on to %s: %s", len(messages), channel,
                        "channel full" if full else exc)
            for message in messages:
                await self._undelivered(message, protocol.BROKER_OVERLOADED if full
                                        else f"{protocol.BROKER_UNAVAILABLE}: {exc}")

    async def _undelivered(self, message: dict[str, Any], error: str) -> None:
        """A forward that never left: answer its request, never leave it hanging.

        (An answer for another process that could not be sent is lost: that process
        answers its request when it times out.)
        """
        if message["type"] != events.FORWARD:
            return
        pending = self.pending.get(message["key"])
        if pending is not None and pending.worker_id == message["worker_id"]:
            await self._give_back(message["worker_id"])
            await self._fail(pending, error)

    async def _give_back(self, worker_id: str) -> None:
        """Release a slot taken for a request that never reached its worker."""
        try:
            await self.release(worker_id, latency_ms=None, ok=True)
        except RegistryUnavailable:
            pass  # the slot's entry expires with its heartbeat

    async def _release_many(self, outcomes: list[tuple[str, float | None, bool]]) -> None:
        try:
            await self.registry.release_many(outcomes)
        except RegistryUnavailable as exc:
            log.warning("could not give back %d worker slot(s): %s", len(outcomes), exc)
        self.kick()

    async def _queue_loop(self) -> None:
        """Retry queued requests when a slot frees (or every poll, across processes)."""
        while True:
            if self.waiting:
                try:
                    await asyncio.wait_for(self._wake.wait(), QUEUE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            batch = [self.waiting.popleft() for _ in range(len(self.waiting))]
            await self._assign(batch)  # may queue some again
            # Cleared after the pass, so that re-queueing above does not spin the loop;
            # a wake-up lost here costs at most one poll interval.
            self._wake.clear()

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

        A worker consumer reports the requests it held when its socket closes; but if
        its whole broker process dies, nobody does. Its workers then drop out of the
        shared registry when their heartbeats expire, and this notices.
        """
        held = [p for p in self.pending.values() if p.worker_id is not None]
        if not held:
            return
        live = await self.registry.channels(p.worker_id for p in held)  # type: ignore[misc]
        for pending in held:
            if pending.worker_id is not None and \
                    live.get(pending.worker_id) != pending.worker_channel:
                await self._on_lost(events.lost(pending.key, pending.worker_id,
                                                "worker vanished"))

    # ------------------------------------------------------------------ answers

    async def _on_reply(self, message: dict[str, Any]) -> None:
        pending = self.pending.get(message["key"])
        if pending is None or pending.worker_id != message["worker_id"]:
            self.stats["late"] += 1
            log.info("dropped a late answer from worker %s (request already answered)",
                     message["worker_id"])
            return
        self.kick()
        await self._finish(pending, ApiResponse(
            pending.request_id, message["success"], message["data"], message["error"],
            message["worker_id"]))

    async def _on_lost(self, message: dict[str, Any]) -> None:
        pending = self.pending.get(message["key"])
        if pending is None or pending.worker_id != message["worker_id"]:
            return
        self.stats["lost"] += 1
        pending.worker_id = None
        pending.lost_because = message["reason"]
        if not pending.retry_safe:
            await self._fail(pending, f"{protocol.WORKER_LOST} ({message['reason']}); "
                                      f"'{pending.command}' is not idempotent, so it was "
                                      "not retried")
            return
        if pending.attempts > conf.get("MAX_RETRIES"):
            await self._fail(pending, f"{protocol.WORKER_LOST} ({message['reason']}) "
                                      f"after {pending.attempts} attempts")
            return
        log.info("request %s: worker %s lost (%s), re-dispatching", pending.request_id,
                 message["worker_id"], message["reason"])
        self.stats["redispatched"] += 1
        await self._assign([pending])

    def _expire(self, key: str) -> None:
        pending = self.pending.get(key)
        if pending is not None:
            self.stats["timeouts"] += 1
            asyncio.ensure_future(self._fail(pending, protocol.TIMEOUT))

    async def _fail(self, pending: Pending, error: str) -> None:
        await self._finish(pending, ApiResponse.failure(pending.request_id, error))

    async def _finish(self, pending: Pending, response: ApiResponse) -> None:
        """Answer once: the only place a request leaves :attr:`pending`."""
        if self.pending.pop(pending.key, None) is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        now = time.time()
        self.stats["answered"] += 1
        self.recorder.record_request(
            request_id=pending.request_id, command=pending.command,
            worker_id=response.processed_by, success=response.success, error=response.error,
            latency_ms=(now - pending.started) * 1000, attempts=pending.attempts,
            requester=pending.requester, started_at=pending.started, finished_at=now)
        try:
            await pending.respond(response)
        except Exception:  # the requester is gone; nobody is left to tell
            log.debug("could not deliver the answer to %s", pending.requester, exc_info=True)


_dispatchers: PerLoop[Dispatcher] = PerLoop(
    lambda: Dispatcher(get_channel_layer(), get_registry(), get_recorder()))

#: The dispatcher of this process (of this event loop), started on first use.
get_dispatcher = _dispatchers.get
#: Stop this loop's dispatcher, if one was started (shutdown, tests).
stop_dispatcher = _dispatchers.stop
