"""The broker's side of one worker connection: what it holds, and whether it lives.

A worker socket (:class:`dispatch.transport.workers.WorkerConsumer`) parses frames
and sends them; a :class:`WorkerLink` decides: registration (ownership of the
worker id, allow-lists, caps: :mod:`.registration`), the requests the worker holds
(:mod:`.held`), and the liveness verdicts (registered in time, heard from lately,
answering pings). It talks to the rest of its process only through a
:class:`LinkHost` (the process's :class:`~.connections.WorkerConnections`). One task
per process checks every link (:func:`watch`), not one task per connection: with
thousands of idle workers, these checks are most of what the broker does.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from typing import Any, Protocol

from workers import protocol
from workers.protocol import (ChunkBody, CloseCode, ErrorCode, Feature, Message,
                              MessageType, ProgressBody, Registration, ResponseBody, quote)

from .. import conf
from ..auth import Grant
from ..balancing import Health
from ..errors import RegistryUnavailable
from ..history import HistoryRecorder
from ..logsafe import LogBudget
from ..registry import Registry, WorkerEntry
from . import registration
from .events import Adopt, Chunk, Departure, Event, Forward, Lost, Progress, Reply
from .held import Assignment, Due, Held
from .pulse import Pulse, Verdict
from .registration import FLEET_LOG

log = logging.getLogger("dispatch.links")


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


class LinkHost(Protocol):
    """What a link needs of its process: the registry, the way to the other processes'
    inboxes, slots to give back; and to be known as a registered worker of it."""

    process: str
    registry: Registry
    stats: Counter[str]

    @property
    def inbox(self) -> str: ...

    def registered(self, link: WorkerLink) -> None: ...

    def forget(self, link: WorkerLink) -> None: ...

    async def deliver(self, to: str, event: Event) -> None: ...

    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None: ...

    def slot_freed(self) -> None: ...

    async def adopt(self, entry: WorkerEntry, reported: list[str]) -> list[Forward]: ...


#: Failure codes a handler did not mean: they worsen its worker's score.
UNMEANT_ERRORS = frozenset({None, ErrorCode.HANDLER_FAILED.value, ErrorCode.WORKER_ERROR.value})


#: Why a request whose worker sends chunks without waiting for acknowledgements fails.
WINDOW_IGNORED = (f"The worker sent over {2 * protocol.CHUNK_WINDOW} chunks without "
                  "waiting for their acknowledgement")


class LinkState(enum.Enum):
    """A worker connection's life."""

    CONNECTED = "connected"  # admitted, not registered yet
    REGISTERED = "registered"  # in the registry: it gets requests
    CLOSED = "closed"  # torn down: out of the registry, its requests handed back


class WorkerLink:
    """One worker connection, registered or not yet."""

    def __init__(self, socket: WorkerSocket, host: LinkHost, grant: Grant,
                 recorder: HistoryRecorder) -> None:
        self.socket = socket
        self.host = host
        self.grant = grant
        self.recorder = recorder
        self.session_id = protocol.random_id(16)
        self.connection = f"worker.{self.session_id}"  # its name in registry and process
        self.state = LinkState.CONNECTED
        self.entry: WorkerEntry | None = None
        self.held = Held()
        self.pulse = Pulse.started(time.monotonic(), conf.get("HEARTBEAT_INTERVAL"))
        #: What it asked for at registration (:class:`Feature`), all granted.
        self.features: frozenset[Feature] = frozenset()

    @property
    def label(self) -> str:
        return quote(self.entry.worker_id) if self.entry else f"(unregistered {self.socket.peer})"

    def heard(self) -> None:
        """Any frame from the worker: it is not silent."""
        self.pulse.last_frame = time.monotonic()

    # ------------------------------------------------------------------ registration

    async def register(self, reg: Registration, msg_id: str) -> None:
        """A ``connect`` frame: register the worker, or refuse and close, saying why."""
        admitted = await registration.admit(self, reg, msg_id)
        if admitted is None:
            return
        entry, adopted = admitted
        self.entry, self.state, self.features = entry, LinkState.REGISTERED, reg.features
        self.held.pending = set(reg.jobs) - {f.key for f in adopted}
        for forward in adopted:  # running there since before the restart: held, not sent
            self.held.take_on(forward, 0, entry.leases.get(forward.command), time.monotonic())
        self.host.registered(self)
        await self.socket.send_frame(Message(MessageType.CONNECT.value,
                                             registration.welcome(reg, entry, adopted)))
        registration.announce(self, reg, entry)
        self.host.slot_freed()

    async def heartbeat(self, msg: Message) -> None:
        entry = self.entry
        assert entry is not None
        # The socket is alive whatever the registry says: ack first (a quiet worker's
        # beat only when it asks: it has heard nothing from us for a while).
        if "ack" in msg.data:
            self.pulse.ping_out = None
        elif msg.data.get("want_ack") is True or Feature.QUIET_HEARTBEAT not in self.features:
            await self.socket.send_frame(Message.heartbeat(ack=msg.msg_id))
        self.recorder.worker_seen(self.session_id, time.time())
        try:
            if not await self.host.registry.touch(entry.worker_id):
                await registration.restore(self, entry)
        except RegistryUnavailable as exc:  # touched again at the next beat
            self.socket.logs.log(log, logging.WARNING, "worker %s: heartbeat not recorded: %s",
                                 self.label, exc)

    # ------------------------------------------------------------------ requests

    async def assign(self, forward: Forward) -> None:
        """Hand one forwarded request to the worker (written beside the loop if slow)."""
        frame = Message.request(forward.command, forward.data, msg_id=forward.key,
                                time_left=forward.timeout, stream=forward.stream,
                                traceparent=forward.traceparent or None).envelope()
        text = protocol.dumps_fast(frame) or await asyncio.to_thread(protocol.dumps, frame)
        if self.state is not LinkState.REGISTERED:
            await self.host.deliver(forward.reply_to, Lost(
                forward.key, self.entry.worker_id if self.entry else "", "connection closed"))
            return
        now = time.monotonic()
        self.held.take_on(forward, len(text), self.entry.leases.get(  # type: ignore[union-attr]
            forward.command), now)
        if Feature.BATCH in self.features and len(self.held) > 1:
            # Under load (it holds others): this one goes with those sent it this turn
            # of the loop, in one frame. Alone, it goes at once: no latency added.
            self.socket.gather(text)
        else:
            await self.socket.send_text(text)

    async def answer(self, body: ResponseBody, msg_id: str) -> None:
        """The worker answered one of its requests (or claims to)."""
        assert self.entry is not None
        assignment = self.held.take(body.request_id)
        if assignment is not None and assignment.cancelled is not None:
            # Its requester was answered when it cancelled: this is the worker saying it
            # stopped (or finished anyway). The slot is free again; the answer is not sent.
            self.host.stats["answered_after_cancel"] += 1
            await self._release(None, assignment.verdict)
            return
        if assignment is None:
            self.host.stats["late"] += 1
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
        await self.host.deliver(assignment.reply_to, Reply(
            body.request_id, self.entry.worker_id, body.success, body.data, body.error,
            latency_ms, None if body.success else ErrorCode.from_worker(body.code).value))

    async def fail(self, request_id: str, msg_id: str | None, error: str,
                   code: ErrorCode) -> bool:
        """Fail a held request for an answer too large or chunks past the window; no
        verdict on the worker (requesters must not eject). False: not held."""
        assignment = self.held.take(request_id)
        if assignment is None or self.entry is None:
            return False
        await self._release(None, Health.UNKNOWN)
        await self.host.deliver(assignment.reply_to, Reply(
            request_id, self.entry.worker_id, False, None, error,
            (time.monotonic() - assignment.started) * 1000, code.value))
        await self.socket.refuse(f"{error}: request {quote(request_id)} failed", msg_id, code)
        return True

    def _alive(self, request_id: str) -> Assignment | None:
        """The held, uncancelled request a progress or chunk frame is about: it lives."""
        assignment = self.held.get(request_id)
        if assignment is None or assignment.cancelled is not None:
            return None
        assignment.last_life = time.monotonic()
        return assignment

    async def progress(self, body: ProgressBody) -> None:
        """The worker says how far a request got (or only that it lives)."""
        assignment = self._alive(body.request_id)
        if assignment is not None and (body.progress is not None or body.message is not None):
            await self.host.deliver(assignment.reply_to, Progress(
                body.request_id, self.entry.worker_id, body.progress,  # type: ignore
                body.message))

    async def chunk(self, body: ChunkBody) -> None:
        """One partial result: passed on to the request's process, which acks it."""
        assignment = self._alive(body.request_id)
        if assignment is None:
            return
        if not assignment.chunk_passed():
            await self.fail(body.request_id, None, WINDOW_IGNORED, ErrorCode.WORKER_ERROR)
            return
        await self.host.deliver(assignment.reply_to, Chunk(
            body.request_id, self.entry.worker_id, body.seq, body.data,  # type: ignore
            self.host.inbox, self.connection))

    async def adopt(self, adopt: Adopt) -> bool:
        """Another process took over a request this worker runs: hold it for that one
        (and tell the worker, if it was waiting to hear)."""
        if self.entry is None or self.entry.worker_id != adopt.worker_id:
            return False
        held = adopt.key in self.held
        if not self.held.adopt(adopt, self.entry.leases.get(adopt.command), time.monotonic()):
            return False
        if not held:
            await self.socket.send_frame(Message(MessageType.ADOPT.value, {"jobs": [adopt.key]}))
        return True

    async def chunk_acked(self, key: str, seq: int) -> None:
        if (assignment := self.held.get(key)) is not None:
            assignment.unacked -= 1
            await self.socket.send_frame(Message.chunk_ack(key, seq))

    async def cancel(self, key: str, reason: str) -> None:
        """Its requester was answered ``cancelled``: tell the worker to stop. The slot
        is free when the worker answers, or after CANCEL_GRACE."""
        assignment = self.held.get(key)
        if assignment is None or assignment.cancelled is not None:
            return
        assignment.cancelled = time.monotonic()
        await self.socket.send_frame(Message.cancel(key, reason))

    async def _release(self, latency_ms: float | None, health: Health) -> None:
        try:
            await self.host.release(self.entry.worker_id,  # type: ignore[union-attr]
                                    latency_ms=latency_ms, health=health)
        except RegistryUnavailable as exc:  # the answer still goes out
            log.warning("worker %s: could not release its slot: %s", self.label, exc)

    # ------------------------------------------------------------------ liveness

    def idle_and_well(self, now: float, interval: float) -> bool:
        """Nothing for :meth:`check` to do: registered, nothing held, pulse quiet."""
        return (self.state is LinkState.REGISTERED and not self.held and
                self.pulse.quiet_enough(now, interval, Feature.QUIET_HEARTBEAT in self.features))

    async def check(self, now: float) -> None:
        """The fleet's periodic look: drop the silent and the deaf, ping, expire slots."""
        pulse = self.pulse
        verdict = pulse.look(now, registered=self.state is LinkState.REGISTERED,
                             register_timeout=conf.get("REGISTER_TIMEOUT"),
                             interval=conf.get("HEARTBEAT_INTERVAL"),
                             misses=conf.get("HEARTBEAT_MISSES"),
                             quiet=Feature.QUIET_HEARTBEAT in self.features)
        if verdict is Verdict.UNREGISTERED:
            await self.socket.refuse("No 'connect' frame in time; closing", None,
                                     ErrorCode.BAD_REQUEST)
            await self.close(CloseCode.BAD_REGISTRATION, "did not register")
        elif verdict is Verdict.SILENT:
            log.warning("worker %s silent for %.1fs: dropping it", self.label,
                        now - pulse.last_frame)
            await self.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        elif verdict is Verdict.DEAF:  # it does not read: what we send it would pile up
            log.warning("worker %s has not answered a ping for %.1fs: dropping it",
                        self.label, now - pulse.ping_out)  # type: ignore[operator]
            await self.close(CloseCode.HEARTBEAT_TIMEOUT, "not answering pings")
        elif self.state is LinkState.REGISTERED:
            if verdict is Verdict.PING:
                await self.socket.send_frame(Message.heartbeat())
            await self._expire(now)

    async def _expire(self, now: float) -> None:
        """Slots past their deadline, cancels past their grace, jobs past their lease."""
        for key, assignment, due in self.held.due(now, conf.get("CANCEL_GRACE")):
            if due is Due.UNCONFIRMED:  # never confirmed: free it anyway
                await self._release(None, assignment.verdict)
            elif due is Due.TIMED_OUT:
                # A timed-out request counts as slow as it was: a worker that never
                # answers must not look fast to the balancer. No verdict on its health:
                # the time was the requester's to choose.
                await self._release((now - assignment.started) * 1000, Health.UNKNOWN)
            else:
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
        await self.host.deliver(assignment.reply_to, Lost(
            key, self.entry.worker_id,  # type: ignore[union-attr]
            f"no sign of life for {quiet:.0f}s, lease {assignment.lease:g}s",
            ErrorCode.LEASE_EXPIRED.value))

    async def close(self, code: int, reason: str, tell: bool = False,
                    departure: Departure = Departure.CLOSED) -> None:
        """Tear down and close; ``tell``: say why in an error frame first."""
        if tell:
            await self.socket.send_frame(Message.error(reason))
        await self.teardown(reason, departure)
        await self.socket.close(code)

    async def teardown(self, reason: str, departure: Departure = Departure.CLOSED) -> None:
        """Leave the registry and hand every unanswered request back: once only."""
        if self.state is LinkState.CLOSED:
            return
        self.state, entry = LinkState.CLOSED, self.entry
        self.host.forget(self)
        if entry is None:  # it never registered
            return
        try:
            await self.host.registry.remove(entry.worker_id, self.connection)
        except RegistryUnavailable as exc:  # its entry expires with its heartbeat
            log.warning("worker %s: could not leave the registry: %s", self.label, exc)
        held = self.held.take_all()
        if Feature.RESUME not in self.features:
            departure = Departure.CLOSED  # it stops its jobs when its connection ends
        for key, assignment in held.items():
            await self.host.deliver(assignment.reply_to, Lost(key, entry.worker_id, reason,
                                                              departure=departure))
        self.recorder.worker_disconnected(self.session_id, time.time(),
                                          entry.completed + entry.errors, entry.worker_id)
        FLEET_LOG.log(log, logging.INFO, "worker %s left (%s); request(s) it held: %d%s",
                      self.label, reason, len(held), "" if departure is Departure.CLOSED else
                      " (it goes on)")

    # ------------------------------------------------------------------ from its process

    async def notify(self, message: Any, extra: dict[str, Any]) -> None:
        """A broadcast notification to pass on."""
        if self.state is LinkState.REGISTERED:
            await self.socket.send_frame(Message.notification(message, **extra))

    async def stop_taking_work(self) -> None:
        """Out of rotation: what it holds still finishes."""
        try:
            if self.state is LinkState.REGISTERED:
                await self.host.registry.set_draining(self.entry.worker_id, True)  # type: ignore
        except RegistryUnavailable as exc:
            log.warning("worker %s: could not take it out of rotation: %s", self.label, exc)

    async def leave(self, reason: str, retry_after: float | None = None) -> None:
        """The broker is going away: tell the worker (and when to come back), then close."""
        later = {} if retry_after is None else {"retry_after": retry_after}
        await self.socket.send_frame(Message(MessageType.DISCONNECT.value,
                                             {"reason": reason, **later}))
        await self.close(CloseCode.SHUTTING_DOWN, reason, departure=Departure.SENT_AWAY)


async def watch(links: set[WorkerLink]) -> None:
    """Check every link of this process, twice per heartbeat interval, in one task."""
    while True:
        interval = conf.get("HEARTBEAT_INTERVAL")
        await asyncio.sleep(interval / 2)
        now = time.monotonic()
        for link in list(links):
            if link.state is LinkState.CLOSED or link.idle_and_well(now, interval):
                continue
            try:
                await link.check(now)
            except RegistryUnavailable as exc:
                log.warning("worker %s: %s", link.label, exc)
            except Exception:  # one link must not stop the checks of the others
                log.exception("checking worker %s failed", link.label)
