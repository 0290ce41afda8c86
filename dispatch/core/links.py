"""The broker's side of one worker connection: what it holds, and whether it lives.

A worker socket (:class:`dispatch.transport.workers.WorkerConsumer`) parses frames
and sends them; a :class:`WorkerLink` decides: registration (ownership of the
worker id, allow-lists, caps), the requests the worker holds, their slots and
deadlines, and the liveness verdicts (registered in time, heard from lately,
answering pings). One task per process checks every link (:func:`watch`), not one
task per connection: with thousands of idle workers, these checks are most of
what the broker does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from workers import protocol
from workers.protocol import (ChunkBody, CloseCode, ErrorCode, Feature, Message,
                              MessageType, ProgressBody, Registration, ResponseBody, quote)

from .. import conf
from ..auth import Grant
from ..history import HistoryRecorder
from ..logsafe import LogBudget
from ..registry import RegistryUnavailable, WorkerEntry, WorkerIdTaken
from . import events
from .balancing import Health

if TYPE_CHECKING:
    from .dispatcher import Dispatcher

log = logging.getLogger("dispatch.links")

#: Lines about workers coming and going, for the whole process: a fleet of thousands
#: dialling back after a restart gets a few lines and counts, not a line each.
FLEET_LOG = LogBudget(burst=50, refill_seconds=0.1)


class WorkerSocket(Protocol):
    """What a link needs of its socket."""

    peer: Any
    logs: LogBudget

    async def send_frame(self, msg: Message) -> None: ...

    async def send_text(self, text: str) -> None: ...

    def gather(self, text: str) -> None: ...

    async def refuse(self, error: str, request_id: str | None = None,
                     code: ErrorCode | None = None) -> None: ...

    async def close(self, code: int | bool | None = None, reason: str | None = None
                    ) -> None: ...


@functools.lru_cache(maxsize=64)
def _shared(text: str) -> str:
    """One copy of each distinct schemas text: a fleet registers the same few, and a
    worker's entry then costs no more than before."""
    return text


#: Heartbeat intervals of silence after which a quiet-heartbeat worker is pinged: it
#: beats every interval, so one that is this late has missed a beat.
QUIET_PING_AFTER = 1.5

#: Failure codes a handler did not mean: they worsen its worker's score.
UNMEANT_ERRORS = frozenset({None, ErrorCode.HANDLER_FAILED.value, ErrorCode.WORKER_ERROR.value})


@dataclass(slots=True)
class Assignment:
    """A request this worker has been given and has yet to answer."""

    reply_to: str  # the inbox of the dispatcher that holds the request
    started: float  # time.monotonic()
    deadline: float  # time.monotonic()
    size: int  # characters of the frame sent for it
    stream: bool = False  # the requester wants its progress and chunks
    lease: float | None = None  # seconds within which it must show life
    last_life: float = 0.0  # time.monotonic() of its last progress, chunk or start
    cancelled: float | None = None  # when the worker was told to stop it
    #: What its slot's release will say about the worker, once it is cancelled: no
    #: verdict for a requester's cancel, a fault for a lease that ran out.
    verdict: Health = Health.UNKNOWN


class WorkerLink:
    """One worker connection, registered or not yet."""

    def __init__(self, socket: WorkerSocket, dispatcher: Dispatcher, grant: Grant,
                 recorder: HistoryRecorder) -> None:
        self.socket = socket
        self.dispatcher = dispatcher
        self.grant = grant
        self.recorder = recorder
        self.session_id = protocol.random_id(16)
        #: Names this connection in the registry and in its dispatcher (no layer channel).
        self.channel = f"worker.{self.session_id}"
        self.entry: WorkerEntry | None = None
        self.assignments: dict[str, Assignment] = {}
        self.assigned_chars = 0
        self.opened = self.last_frame = time.monotonic()
        self.next_ping = self.opened + conf.get("HEARTBEAT_INTERVAL")
        #: When the oldest ping still unanswered was sent (None: all answered).
        self.ping_out: float | None = None
        #: What it asked for at registration (:class:`Feature`), all granted.
        self.features: frozenset[Feature] = frozenset()
        self.closed = False

    @property
    def label(self) -> str:
        return quote(self.entry.worker_id) if self.entry else f"(unregistered {self.socket.peer})"

    @property
    def busy(self) -> int:
        """Requests this worker holds."""
        return len(self.assignments)

    def heard(self) -> None:
        """Any frame from the worker: it is not silent."""
        self.last_frame = time.monotonic()

    # ------------------------------------------------------------------ registration

    async def register(self, reg: Registration, msg_id: str) -> None:
        """A ``connect`` frame: register the worker, or refuse and close, saying why."""
        refused = self.grant.refused_commands([*reg.commands, *reg.no_retry])
        if refused:
            await self._refuse_registration(
                "Bad registration: Commands not allowed for this worker token: "
                + ", ".join(f"'{quote(c, 60)}'" for c in refused[:20])
                + (f" and {len(refused) - 20} more" if len(refused) > 20 else ""),
                msg_id, ErrorCode.NOT_ALLOWED, CloseCode.BAD_REGISTRATION)
            return
        weight = min(reg.weight, conf.get("MAX_WORKER_WEIGHT"))
        max_concurrency = min(reg.max_concurrency, conf.get("MAX_WORKER_CONCURRENCY"))
        if (weight, max_concurrency) != (reg.weight, reg.max_concurrency):
            FLEET_LOG.log(log, logging.WARNING, "worker %s asked for weight %s and "
                          "max_concurrency %s; capped to %s and %s (BROKER_MAX_WORKER_WEIGHT, "
                          "BROKER_MAX_WORKER_CONCURRENCY)", quote(reg.worker_id), reg.weight,
                          reg.max_concurrency, weight, max_concurrency)
        dispatcher = self.dispatcher
        entry = WorkerEntry(
            worker_id=reg.worker_id, name=reg.name, channel=self.channel,
            commands=frozenset(reg.commands), weight=weight, max_concurrency=max_concurrency,
            process=dispatcher.process, address=str(self.socket.peer),
            session_id=self.session_id, no_retry=frozenset(reg.no_retry),
            inbox=dispatcher.channel, owner=self.grant.owner, leases=dict(reg.leases),
            labels=dict(reg.labels), version=reg.version, hedge=frozenset(reg.hedge),
            schemas=_shared(protocol.dumps(reg.schemas)) if reg.schemas else "")
        try:
            if await self.recorder.recent_owner_other_than(reg.worker_id, entry.owner):
                raise WorkerIdTaken(reg.worker_id)
            replaced = await dispatcher.registry.add(entry)
        except WorkerIdTaken:
            self.socket.logs.log(log, logging.WARNING, "%s tried to register worker id %s, "
                                 "which belongs to another credential: refused",
                                 self.socket.peer, quote(reg.worker_id))
            await self._refuse_registration(
                f"Worker id '{quote(reg.worker_id)}' belongs to another credential: choose "
                "another id", msg_id, ErrorCode.NOT_ALLOWED, CloseCode.WORKER_ID_TAKEN)
            return
        except RegistryUnavailable as exc:  # the worker retries with backoff
            await self._refuse_registration(f"{protocol.BROKER_UNAVAILABLE}: {exc}", msg_id,
                                            ErrorCode.BROKER_UNAVAILABLE,
                                            CloseCode.TRY_AGAIN_LATER)
            return
        self.entry = entry
        if replaced is not None and replaced.channel != self.channel:
            log.warning("worker %s reconnected; closing its previous connection",
                        quote(reg.worker_id))
            await dispatcher.deliver(replaced.inbox, events.kick(
                replaced.channel, "Replaced by a newer connection with the same worker_id",
                CloseCode.REPLACED))
        dispatcher.local_workers[self.channel] = self
        self.features = reg.features
        answer: dict[str, Any] = {
            "worker_id": reg.worker_id, "heartbeat_interval": conf.get("HEARTBEAT_INTERVAL"),
            "process": dispatcher.process, "weight": weight,
            "max_concurrency": max_concurrency}
        if reg.features:
            answer["features"] = Feature.listed(reg.features)
            answer["max_message_bytes"] = conf.get("MAX_MESSAGE_BYTES")
        if reg.schemas_dropped:  # it registered; it is told what describe will not show
            answer["schemas_dropped"] = reg.schemas_dropped
            self.socket.logs.log(log, logging.WARNING, "worker %s: schemas not kept: %s",
                                 self.label, quote("; ".join(reg.schemas_dropped), 300))
        await self.socket.send_frame(Message(MessageType.CONNECT.value, answer))
        self.recorder.worker_connected(
            session_id=self.session_id, worker_id=reg.worker_id, name=reg.name,
            address=str(self.socket.peer), process=dispatcher.process, commands=reg.commands,
            weight=weight, max_concurrency=max_concurrency, connected_at=entry.connected_at,
            owner=entry.owner)
        dispatcher.kick()
        FLEET_LOG.log(log, logging.INFO, "worker %s (%s) registered from %s: %s",
                      quote(reg.worker_id), quote(reg.name), self.socket.peer,
                      quote(", ".join(reg.commands), 300))

    async def _refuse_registration(self, error: str, msg_id: str, code: ErrorCode,
                                   close: CloseCode) -> None:
        await self.socket.refuse(error, msg_id, code)
        await self.socket.close(close)

    async def heartbeat(self, msg: Message) -> None:
        entry = self.entry
        assert entry is not None
        # The socket is alive whatever the registry says: ack first (a quiet worker's
        # beat only when it asks: it has heard nothing from us for a while).
        if "ack" in msg.data:
            self.ping_out = None
        elif msg.data.get("want_ack") is True or Feature.QUIET_HEARTBEAT not in self.features:
            await self.socket.send_frame(Message.heartbeat(ack=msg.msg_id))
        self.recorder.worker_seen(self.session_id, time.time())
        try:
            if not await self.dispatcher.registry.touch(entry.worker_id):
                await self._register_again(entry)
        except RegistryUnavailable as exc:  # touched again at the next beat
            self.socket.logs.log(log, logging.WARNING, "worker %s: heartbeat not recorded: %s",
                                 self.label, exc)

    async def _register_again(self, entry: WorkerEntry) -> None:
        """Put a live worker back after the shared state lost it (Redis restarted empty)."""
        log.warning("worker %s was missing from the registry; registering it again",
                    quote(entry.worker_id))
        entry.in_flight = len(self.assignments)
        try:
            await self.dispatcher.registry.add(entry)
        except WorkerIdTaken:  # another credential took the id meanwhile: it is theirs now
            await self.socket.refuse(f"Worker id '{quote(entry.worker_id)}' belongs to "
                                     "another credential now", None, ErrorCode.NOT_ALLOWED)
            await self.close(CloseCode.WORKER_ID_TAKEN, "worker id taken")

    async def draining(self) -> None:
        """The worker is leaving: no new work; it closes once its requests are done."""
        log.info("worker %s is draining before it leaves", self.label)
        await self.dispatcher.registry.set_draining(self.entry.worker_id, True)  # type: ignore

    # ------------------------------------------------------------------ requests

    async def assign(self, message: dict[str, Any]) -> None:
        """Hand one forwarded request to the worker (from the layer or in-process)."""
        if self.closed or self.entry is None:
            await self.dispatcher.deliver(message["reply_to"], events.lost(
                message["key"], self.entry.worker_id if self.entry else "", "connection closed"))
            return
        now = time.monotonic()
        stream = message.get("stream", False)
        frame = Message.request(message["action"], message["params"], msg_id=message["key"],
                                time_left=message["timeout"], stream=stream,
                                traceparent=message.get("traceparent"))
        text = frame.to_json()
        self.assignments[message["key"]] = Assignment(
            message["reply_to"], now, now + message["timeout"], len(text), stream,
            self.entry.leases.get(message["action"]), now)
        self.assigned_chars += len(text)
        if Feature.BATCH in self.features and len(self.assignments) > 1:
            # Under load (it holds others): this one goes with those sent it this turn
            # of the loop, in one frame. Alone, it goes at once: no latency added.
            self.socket.gather(text)
        else:
            await self.socket.send_text(text)

    def _take(self, key: str) -> Assignment | None:
        assignment = self.assignments.pop(key, None)
        if assignment is not None:
            self.assigned_chars -= assignment.size
        return assignment

    async def answer(self, body: ResponseBody, msg_id: str) -> None:
        """The worker answered one of its requests (or claims to)."""
        assert self.entry is not None
        assignment = self._take(body.request_id)
        if assignment is not None and assignment.cancelled is not None:
            # Its requester was answered when it cancelled: this is the worker saying it
            # stopped (or finished anyway). The slot is free again; the answer is not sent.
            self.dispatcher.stats["answered_after_cancel"] += 1
            await self._release(None, assignment.verdict)
            return
        if assignment is None:
            self.dispatcher.stats["late"] += 1
            self.socket.logs.log(log, logging.WARNING, "worker %s answered request %s, which "
                                 "it does not hold (late or unknown): dropped", self.label,
                                 quote(body.request_id))
            await self.socket.refuse(f"Not holding request '{quote(body.request_id)}' "
                                     "(answered already, timed out, or never sent): answer "
                                     "dropped", msg_id, ErrorCode.NOT_HOLDING)
            return
        latency_ms = (time.monotonic() - assignment.started) * 1000
        # A handler's own error (bad parameters, CommandError) is the caller's business,
        # not ill health of the worker; one it did not mean (an exception, or a worker
        # that does not say) worsens its score, as a black hole must not look fast.
        await self._release(latency_ms, Health.OK if body.success or body.code not in
                            UNMEANT_ERRORS else Health.ERROR)
        await self.dispatcher.deliver(assignment.reply_to, events.reply(
            body.request_id, self.entry.worker_id, body.success, body.data, body.error,
            latency_ms, body.code))

    async def answer_too_large(self, body: ResponseBody, msg_id: str, size: int,
                               limit: int) -> bool:
        """An answer too large to pass on fails its request now, and frees the slot.

        False if the worker does not hold that request (the frame is refused as such).
        """
        assignment = self._take(body.request_id)
        if assignment is None or self.entry is None:
            return False
        error = f"{protocol.ANSWER_TOO_LARGE}: {size} bytes > limit {limit}"
        await self._release(None, Health.FAULT)
        await self.dispatcher.deliver(assignment.reply_to, events.reply(
            body.request_id, self.entry.worker_id, False, None, error,
            (time.monotonic() - assignment.started) * 1000, ErrorCode.TOO_LARGE.value))
        await self.socket.refuse(f"{error}: request {quote(body.request_id)} failed; send "
                                 "smaller answers", msg_id, ErrorCode.TOO_LARGE)
        return True

    async def progress(self, body: ProgressBody) -> None:
        """The worker says how far a request got (or only that it lives)."""
        assignment = self.assignments.get(body.request_id)
        if assignment is None or assignment.cancelled is not None:
            return
        assignment.last_life = time.monotonic()
        if body.progress is not None or body.message is not None:  # not only a heartbeat
            await self.dispatcher.deliver(assignment.reply_to, events.progress(
                body.request_id, self.entry.worker_id, body.progress,  # type: ignore
                body.message))

    async def chunk(self, body: ChunkBody) -> None:
        """One partial result: passed on to the request's dispatcher, which acks it."""
        assignment = self.assignments.get(body.request_id)
        if assignment is None or assignment.cancelled is not None:
            return
        assignment.last_life = time.monotonic()
        await self.dispatcher.deliver(assignment.reply_to, events.chunk(
            body.request_id, self.entry.worker_id, body.seq, body.data,  # type: ignore
            self.dispatcher.channel, self.channel))

    async def chunk_acked(self, key: str, seq: int) -> None:
        if key in self.assignments:
            await self.socket.send_frame(Message.chunk_ack(key, seq))

    async def cancel(self, key: str, reason: str) -> None:
        """Its requester was answered ``cancelled``: tell the worker to stop. The slot
        is free when the worker answers, or after CANCEL_GRACE."""
        assignment = self.assignments.get(key)
        if assignment is None or assignment.cancelled is not None:
            return
        assignment.cancelled = time.monotonic()
        await self.socket.send_frame(Message.cancel(key, reason))

    async def _release(self, latency_ms: float | None, health: Health) -> None:
        try:
            await self.dispatcher.release(self.entry.worker_id,  # type: ignore[union-attr]
                                          latency_ms=latency_ms, health=health)
        except RegistryUnavailable as exc:  # the answer still goes out
            log.warning("worker %s: could not release its slot: %s", self.label, exc)

    # ------------------------------------------------------------------ liveness

    def idle_and_well(self, now: float, interval: float) -> bool:
        """Nothing for :meth:`check` to do: registered, heard within the interval, no
        ping due or unanswered, nothing held. The common case, kept cheap: with tens
        of thousands of idle workers, these checks are most of what the broker does."""
        return (self.entry is not None and not self.assignments and self.ping_out is None
                and now - self.last_frame < QUIET_PING_AFTER * interval
                and (Feature.QUIET_HEARTBEAT in self.features or now < self.next_ping))

    async def check(self, now: float) -> None:
        """The fleet's periodic look: drop the silent and the deaf, ping, expire slots."""
        interval = conf.get("HEARTBEAT_INTERVAL")
        silence_limit = interval * conf.get("HEARTBEAT_MISSES")
        if self.entry is None:
            if now - self.opened > conf.get("REGISTER_TIMEOUT"):
                await self.socket.refuse("No 'connect' frame in time; closing", None,
                                         ErrorCode.BAD_REQUEST)
                await self.close(CloseCode.BAD_REGISTRATION, "did not register")
            return
        if now - self.last_frame > silence_limit:
            log.warning("worker %s silent for %.1fs: dropping it", self.label,
                        now - self.last_frame)
            await self.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
            return
        if self.ping_out is not None and now - self.ping_out > silence_limit:
            # It talks but does not answer our pings: it is not reading its socket,
            # and what we send it would pile up in memory.
            log.warning("worker %s has not answered a ping for %.1fs: dropping it",
                        self.label, now - self.ping_out)
            await self.close(CloseCode.HEARTBEAT_TIMEOUT, "not answering pings")
            return
        # A seed worker is pinged every other interval; a quiet one only once it has
        # missed a beat (one that beats is never pinged).
        quiet = Feature.QUIET_HEARTBEAT in self.features
        if now >= self.next_ping and (
                not quiet or now - self.last_frame >= QUIET_PING_AFTER * interval):
            self.next_ping = now + 2 * interval
            if self.ping_out is None:
                self.ping_out = now
            await self.socket.send_frame(Message.heartbeat())
        await self._expire(now)

    async def _expire(self, now: float) -> None:
        """Slots past their deadline, cancels past their grace, jobs past their lease."""
        grace = conf.get("CANCEL_GRACE")
        for key, assignment in list(self.assignments.items()):
            if assignment.cancelled is not None:
                if now - assignment.cancelled > grace:  # never confirmed: free it anyway
                    self._take(key)
                    await self._release(None, assignment.verdict)
            elif assignment.deadline < now:
                self._take(key)
                # A timed-out request counts as slow as it was: a worker that never
                # answers must not look fast to the balancer. No verdict on its health:
                # the time was the requester's to choose.
                await self._release((now - assignment.started) * 1000, Health.UNKNOWN)
            elif assignment.lease is not None and now - assignment.last_life > assignment.lease:
                await self._lease_expired(key, assignment, now)

    async def _lease_expired(self, key: str, assignment: Assignment, now: float) -> None:
        """A leased job showed no life for its lease: take it for hung though the socket
        lives. The worker is told to stop; the request is re-sent (or answered)."""
        quiet = now - assignment.last_life
        log.warning("worker %s: request %s showed no life for %.1fs (lease %.0fs): "
                    "taking it for hung", self.label, key, quiet, assignment.lease)
        assignment.cancelled = now
        assignment.verdict = Health.FAULT
        await self.socket.send_frame(Message.cancel(key, f"lease of {assignment.lease:g}s "
                                                         "expired"))
        await self.dispatcher.deliver(assignment.reply_to, events.lost(
            key, self.entry.worker_id,  # type: ignore[union-attr]
            f"no sign of life for {quiet:.0f}s, lease {assignment.lease:g}s",
            ErrorCode.LEASE_EXPIRED.value))

    async def close(self, code: int, reason: str) -> None:
        await self.teardown(reason)
        await self.socket.close(code)

    async def teardown(self, reason: str) -> None:
        """Leave the registry and hand every unanswered request back: once only."""
        if self.closed:
            return
        self.closed = True
        dispatcher = self.dispatcher
        dispatcher.forget_link(self)
        if self.entry is None:
            return
        try:
            await dispatcher.registry.remove(self.entry.worker_id, self.channel)
        except RegistryUnavailable as exc:  # its entry expires with its heartbeat
            log.warning("worker %s: could not leave the registry: %s", self.label, exc)
        assignments, self.assignments = self.assignments, {}
        self.assigned_chars = 0
        for key, assignment in assignments.items():
            await dispatcher.deliver(assignment.reply_to,
                                     events.lost(key, self.entry.worker_id, reason))
        self.recorder.worker_disconnected(self.session_id, time.time(),
                                          self.entry.completed + self.entry.errors,
                                          self.entry.worker_id)
        FLEET_LOG.log(log, logging.INFO, "worker %s left (%s); %d request(s) handed back",
                      self.label, reason, len(assignments))

    # ------------------------------------------------------------------ from the dispatcher

    async def notify(self, message: dict[str, Any]) -> None:
        """A broadcast (``broker.notify``) to pass on."""
        if self.entry is not None:
            await self.socket.send_frame(Message.notification(message["message"],
                                                              **message.get("extra", {})))

    async def kick(self, reason: str, code: int) -> None:
        """Close this socket, saying why (a newer connection took its worker id)."""
        await self.socket.send_frame(Message.error(reason))
        await self.close(code, reason)

    async def stop_taking_work(self) -> None:
        """Out of rotation: what it holds still finishes."""
        if self.entry is not None:
            try:
                await self.dispatcher.registry.set_draining(self.entry.worker_id, True)
            except RegistryUnavailable as exc:
                log.warning("worker %s: could not take it out of rotation: %s",
                            self.label, exc)

    async def leave(self, reason: str, retry_after: float | None = None) -> None:
        """The broker is going away: tell the worker (and when to come back), then close."""
        data: dict[str, Any] = {"reason": reason}
        if retry_after is not None:
            data["retry_after"] = retry_after
        await self.socket.send_frame(Message(MessageType.DISCONNECT.value, data))
        await self.close(CloseCode.SHUTTING_DOWN, reason)


async def watch(links: set[WorkerLink]) -> None:
    """Check every link of this process, twice per heartbeat interval, in one task."""
    while True:
        interval = conf.get("HEARTBEAT_INTERVAL")
        await asyncio.sleep(interval / 2)
        now = time.monotonic()
        for link in list(links):
            if link.closed or link.idle_and_well(now, interval):
                continue
            try:
                await link.check(now)
            except RegistryUnavailable as exc:
                log.warning("worker %s: %s", link.label, exc)
            except Exception:  # one link must not stop the checks of the others
                log.exception("checking worker %s failed", link.label)
