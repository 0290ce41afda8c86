"""The request table: every request this process has yet to answer, without any I/O.

Like the ``Protocol`` of python-websockets, it never awaits and never touches a
socket: the driver (:class:`dispatch.core.dispatcher.Dispatcher`) feeds it what
happened (a request arrived, a slot was reserved, a worker answered, a worker was
lost, a deadline passed) and performs the actions it returns (reserve slots,
forward to a worker, give a slot back, answer a requester). So every rule about a
request's life lives here, in one place, and tests drive it with a fake clock:

* its :class:`State`: RESERVING (a slot is being reserved) -> PLACED (with a worker)
  -> DONE (answered, once);
* no capable worker: answered at once; all capable workers full: WAITING, in a
  bounded queue (:mod:`.waiting`), RESERVING again when a slot may have freed;
* the worker lost: reserving again, at most ``MAX_RETRIES`` times and only if its
  command may run twice (``no_retry``); else answered ``worker_lost``;
* the deadline passed, anywhere: answered ``timeout``;
* cancelled: answered ``cancelled`` at once; a worker that has it is told to stop;
* its lease ran out (a leased job showed no life): like a lost worker, but answered
  ``lease_expired`` when it is not re-sent;
* progress and chunks from its worker go to whoever watches it and asked for them;
  a requester that leaves stops watching, and the request goes on (it may attach
  again);
* every request is answered exactly once; an answer for a request no longer
  placed on that worker (late, duplicate, forged) is dropped and counted;
* waiting requests are served highest priority first, and round-robin between
  credentials within one priority, so one tenant's burst cannot starve the others;
* hedged: a request of a hedgeable command still unanswered after the command's
  recent p95 is placed on a second worker too (within the hedge budget); the first
  answer wins and the other copy is cancelled (:mod:`.hedging`).
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from workers import protocol
from workers.protocol import ApiResponse, ErrorCode

from .. import conf
from ..registry import Reservation, WorkerEntry
from ..balancing import Wanted
from .hedging import HedgePolicy
from .waiting import WaitQueue

#: Characters of routing explanation kept per request (for its history row).
MAX_ROUTING_CHARS = 500


class Sink(Protocol):
    """Who gets a request's answer (and, if it asked, its progress and chunks): a
    requester socket, the control API, another process attached to it."""

    async def answer(self, response: ApiResponse, text: str) -> None: ...

    async def event(self, request_id: str, text: str, *, ack: Any = None,
                    mergeable: bool = False) -> None: ...


@dataclass(slots=True, eq=False)
class Watcher:
    sink: Sink
    stream: bool  # it wants progress and chunk events


class Hedge(enum.Enum):
    """Where a request stands with hedging: a second copy on another worker when the
    first is slow (:mod:`.hedging`)."""

    OFF = "off"  # not hedgeable (its worker does not allow it, a stream, a named worker)
    ARMED = "armed"  # a copy goes when it is slow, if the budget allows
    RESERVING = "reserving"  # a slot for its copy is being reserved
    SENT = "sent"  # a copy went to a second worker


class State(enum.Enum):
    DEFERRED = "deferred"  # not before its time (``not_before``)
    RESERVING = "reserving"  # a slot is being reserved for it
    WAITING = "waiting"  # every capable worker is full: queued
    PLACED = "placed"  # forwarded to a worker, which has yet to answer
    DONE = "done"  # answered (or abandoned): nothing more happens to it


@dataclass(slots=True, frozen=True)
class Placement:
    """A worker a request was forwarded to (two while it is hedged)."""

    worker_id: str
    connection: str  # that worker's connection, to notice a reconnect elsewhere
    inbox: str  # the dispatcher holding that connection

    @property
    def awaited(self) -> bool:
        """Read back after a restart: its worker has yet to come back and report it."""
        return not self.connection


@dataclass(slots=True, eq=False)
class Request:
    """One request this process has yet to answer."""

    key: str  # its name inside the broker (request ids are the requesters' own)
    command: str
    data: dict[str, Any]
    watchers: list[Watcher]
    request_id: str
    requester: str
    deadline: float  # event-loop time
    started: float  # wall time, for history
    opened: float = 0.0  # event-loop time it arrived
    placed: float = 0.0  # event-loop time it was first sent to a worker (0: not yet)
    traceparent: str = ""  # the W3C trace context passed on to its workers (the requester's,
    # or with OpenTelemetry the broker's span's, in the same trace)
    span: Any = None  # the broker's OpenTelemetry span, when tracing is on
    target: str | None = None  # a worker chosen by the caller (broker -> worker `send`)
    owner: str = ""  # the credential that sent it (auth.Grant.owner): who may attach
    priority: int = 0
    select: tuple[tuple[str, str], ...] = ()  # labels its worker must have
    affinity: str | None = None  # requests with one key go to one worker
    hedge: bool = False  # the requester allows a second copy when the first is slow
    cost: int = 0  # bytes it holds parsed, charged to its owner (protocol.parsed_size)
    state: State = State.RESERVING
    placements: list[Placement] = field(default_factory=list)  # the workers that have it
    tried: list[str] = field(default_factory=list)  # every worker it was placed on
    retry_safe: bool = True  # False: the worker said this command must not run twice
    hedging: Hedge = Hedge.OFF
    queued: bool = False  # it waited for a slot (a pass over the queue may take it)
    lost_because: str = ""  # why its last worker was lost, for the error text
    lost_code: ErrorCode = ErrorCode.WORKER_LOST  # and how (lease_expired)
    lost_from: list[str] = field(default_factory=list)  # workers lost under it
    #: Its worker's last progress report (fraction, message), for the dashboard.
    reported: tuple[float | None, str | None] | None = None
    #: Workers whose lease on it ran out: their connection lives on, and a retry there
    #: could mistake that run's last words for this one's, so it goes elsewhere.
    hung_on: list[str] = field(default_factory=list)
    workers_lost: int = 0  # how many workers went away (or hung) under it
    routing: str = ""  # how its workers were chosen (balancing's explanations)
    timer: Any = None  # the driver's deadline timer
    hedge_timer: Any = None
    wait_timer: Any = None  # how long its worker has to come back after a restart
    #: Event-loop time until which "no worker offers it" means "wait": the fleet is
    #: coming back after a broker restart.
    patient_until: float = 0.0
    not_before: float = 0.0  # event-loop time before which it goes to no worker (deferred)
    task: str = ""  # the Django task it runs (module path), for its job row
    keep: float = 0.0  # seconds its answer is kept in the job store (0: RESULT_TTL)
    wait_for_workers: bool = False  # no worker offers it: it waits (patient_until: deadline)
    replay_of: str = ""  # the request id of the failed job it runs again

    def __post_init__(self) -> None:
        if self.wait_for_workers:  # a worker may come any time before its deadline
            self.patient_until = max(self.patient_until, self.deadline)

    @property
    def attempts(self) -> int:
        """Times it was placed on a worker (a hedge counts)."""
        return len(self.tried)

    @property
    def hedged(self) -> bool:
        """A second copy of it was sent."""
        return self.hedging is Hedge.SENT

    @property
    def worker_id(self) -> str | None:
        """The worker it is placed on (the first, while hedged)."""
        return self.placements[0].worker_id if self.placements else None

    def wanted(self) -> Wanted:
        """What to ask of the registry for it: not a worker it hung on, and for a hedge
        anyone but its worker."""
        avoid = [*self.hung_on, *(p.worker_id for p in self.placements)] \
            if self.hedging is Hedge.RESERVING else self.hung_on
        return Wanted(self.command, self.target, self.select, self.affinity,
                      frozenset(avoid))

    def hedging_on(self, worker: WorkerEntry, hedges: HedgePolicy, now: float
                   ) -> list[ArmHedge]:
        """Just placed on ``worker``: whether a copy may go elsewhere when it is slow, and
        the timer for it (once, at its first placement)."""
        if self.hedging is not Hedge.SENT:
            self.hedging = Hedge.ARMED if self.retry_safe and self.target is None \
                and not self.stream and (self.hedge or self.command in worker.hedge) \
                else Hedge.OFF
        if self.hedging is Hedge.ARMED and len(self.tried) == 1:
            delay = hedges.delay(self.command, conf.get("HEDGE_MAX_SHARE"))
            if delay is not None and now + delay < self.deadline:
                return [ArmHedge(self, delay)]
        return []

    def route(self) -> dict[str, Any] | None:
        """What its answer says about how it was routed, when there is something to say."""
        route: dict[str, Any] = {}
        if self.attempts > 1:
            route["attempts"] = self.attempts
        if self.lost_from:
            route["failover_from"] = list(self.lost_from)
        if self.hedged:
            route["hedged"] = True
        if self.traceparent:
            route["traceparent"] = self.traceparent
        return route or None

    @property
    def lost_text(self) -> str:
        """How its last worker was lost, in the words of the error answer."""
        kind = protocol.LEASE_EXPIRED if self.lost_code is ErrorCode.LEASE_EXPIRED else \
            protocol.WORKER_LOST
        return f"{kind} ({self.lost_because})"

    @property
    def stream(self) -> bool:
        """Whether anyone watching wants progress and chunks (the worker is told so)."""
        return any(w.stream for w in self.watchers)


# ---------------------------------------------------------------------------- actions


@dataclass(slots=True)
class Arm:
    """Start the request's deadline timer (it calls :meth:`RequestTable.expired`)."""

    request: Request


@dataclass(slots=True)
class Reserve:
    """Reserve a slot for each (then call :meth:`RequestTable.reserved` for each)."""

    requests: list[Request]


@dataclass(slots=True)
class Forward:
    """Send the request to the worker whose slot was reserved, with ``timeout`` left."""

    request: Request
    worker: WorkerEntry
    timeout: float


@dataclass(slots=True)
class GiveBack:
    """Release a slot taken for a request that will not reach its worker."""

    worker_id: str


@dataclass(slots=True)
class Answer:
    """Answer the requester (its one answer), stop the timer, record it."""

    request: Request
    response: ApiResponse


@dataclass(slots=True)
class Notify:
    """Pass a progress or chunk event (JSON text) to the watchers that asked; ``ack``
    (a chunk's) goes back to the worker once a watcher has taken it. A progress event
    is ``mergeable``: a newer one may replace it while it waits for a slow reader."""

    request: Request
    text: str
    ack: Any = None
    mergeable: bool = False


@dataclass(slots=True)
class CancelOnWorker:
    """Tell a worker that has the request to stop it."""

    request: Request
    reason: str
    placement: Placement


@dataclass(slots=True)
class ArmHedge:
    """In ``delay`` seconds, call :meth:`RequestTable.hedge_due`."""

    request: Request
    delay: float


@dataclass(slots=True)
class AwaitWorker:
    """In ``grace`` seconds, call :meth:`RequestTable.not_back` (its worker did not come
    back to report it)."""

    request: Request
    grace: float


@dataclass(slots=True)
class Defer:
    """In ``delay`` seconds, call :meth:`RequestTable.due` (a deferred request)."""

    request: Request
    delay: float


@dataclass(slots=True)
class Wake:
    """Requests are waiting: serve the queue."""


Action = (Arm | Reserve | Forward | GiveBack | Answer | Notify | CancelOnWorker | ArmHedge
          | AwaitWorker | Defer | Wake)


# ---------------------------------------------------------------------------- the table

#: The answer of a request pushed out of a full queue by another credential's.
QUEUE_SHARED = (f"{protocol.ALL_BUSY}: the queue is full, and places are shared between "
                "credentials (this one held the most)")


class Holdings:
    """What each credential holds in the table, requests and bytes, whatever connections
    sent them: its limits hold across reconnects (MAX_PENDING, MAX_PENDING_BYTES)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def add(self, owner: str, cost: int) -> None:
        self.requests[owner] += 1
        self.bytes[owner] += cost

    def remove(self, owner: str, cost: int) -> None:
        self.requests[owner] -= 1
        self.bytes[owner] -= cost
        if not self.requests[owner]:
            del self.requests[owner], self.bytes[owner]



class _Queueing:
    """The table's queue: requests that wait for a slot, and the passes over them."""

    waiting: WaitQueue[Request]
    stats: Counter[str]
    _returning: list[Request] | None

    def _answer(self, request: Request, error: str, code: ErrorCode) -> Answer:
        raise NotImplementedError

    def _wait(self, request: Request) -> list[Action]:
        if request.queued and self._returning is not None:  # taken by this pass
            request.state = State.WAITING
            self._returning.append(request)
            return []
        actions: list[Action] = [Wake()]
        if len(self.waiting) + len(self._returning or ()) >= conf.get("QUEUE_LIMIT"):
            self.stats["queue_full"] += 1
            pushed = self.waiting.make_room(request.owner)
            if pushed is None:
                return [self._answer(request, protocol.ALL_BUSY, ErrorCode.ALL_BUSY)]
            if pushed.state is State.WAITING:  # else answered already: its place was free
                actions.append(self._answer(pushed, QUEUE_SHARED, ErrorCode.ALL_BUSY))
        request.state = State.WAITING
        request.queued = True
        self.waiting.append(request)
        return actions

    def give_up(self, requests: Iterable[Request], error: str, code: ErrorCode
                ) -> list[Action]:
        """Answer those of them a pass holds unplaced (the registry cannot be asked, or
        they waited too long)."""
        return [self._answer(r, error, code) for r in requests if r.state is State.RESERVING]

    def take_waiting(self) -> list[Request]:
        """The queued requests, in the order to serve them, for a pass over the queue.
        Those that find no slot again, or are not tried (:meth:`untried`), go back to
        the front of the queue when the pass ends (:meth:`end_pass`), in order."""
        batch = [r for r in self.waiting.take_all() if r.state is State.WAITING]
        for request in batch:
            request.state = State.RESERVING
        self._returning = []
        return batch

    def untried(self, requests: Iterable[Request]) -> None:
        """Requests of a pass not tried (one like them just found no slot)."""
        for request in requests:
            if request.state is State.RESERVING:
                request.state = State.WAITING
                self._returning.append(request)  # type: ignore[union-attr]

    def end_pass(self) -> None:
        returning, self._returning = self._returning, None
        self.waiting.put_front([r for r in returning or () if r.state is State.WAITING])


@dataclass
class RequestTable(_Queueing):
    """The requests of one broker process, from arrival to answer."""

    requests: dict[str, Request] = field(default_factory=dict)
    waiting: WaitQueue[Request] = field(default_factory=WaitQueue)
    #: (owner, request_id) -> key: how cancel and attach find a request
    named: dict[tuple[str, str], str] = field(default_factory=dict)
    held: Holdings = field(default_factory=Holdings)
    stats: Counter[str] = field(default_factory=Counter)
    hedges: HedgePolicy = field(default_factory=HedgePolicy)
    accepting: bool = True
    #: During a pass over the queue: the requests it took that must wait again.
    _returning: list[Request] | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def submit(self, request: Request) -> list[Action]:
        if not self.accepting:
            return [self._answer(request, protocol.SHUTTING_DOWN, ErrorCode.SHUTTING_DOWN)]
        self.add(request)
        self.stats["submitted"] += 1
        return [Arm(request), *self.serve(request, request.opened)]

    def serve(self, request: Request, now: float) -> list[Action]:
        """A request to place: later if deferred; queued if others wait for a slot (no
        jumping the queue); else a slot is reserved."""
        if request.not_before > now:
            request.state = State.DEFERRED
            return [Defer(request, request.not_before - now)]
        request.state = State.RESERVING
        if self.waiting:
            return self._wait(request)
        return [Reserve([request])]

    def due(self, key: str, now: float) -> list[Action]:
        """A deferred request's time came."""
        request = self.requests.get(key)
        if request is None or request.state is not State.DEFERRED:
            return []
        return self.serve(request, max(now, request.not_before))

    def add(self, request: Request) -> None:
        """Hold ``request`` (submitted, or read back from the job store)."""
        self.requests[request.key] = request
        self.named[(request.owner, request.request_id)] = request.key
        self.held.add(request.owner, request.cost)

    def find(self, owner: str | None, request_id: str) -> list[Request]:
        """The requests of ``owner`` (None: anyone's) with this request id."""
        if owner is not None:
            key = self.named.get((owner, request_id))
            request = self.requests.get(key) if key is not None else None
            return [request] if request is not None else []
        return [r for r in self.requests.values() if r.request_id == request_id]

    def reserved(self, request: Request, reservation: Reservation, now: float
                 ) -> list[Action]:
        """The registry's answer for a request that was being reserved."""
        worker = reservation.worker
        if request.hedging is Hedge.RESERVING:
            return self._hedge_reserved(request, reservation, now)
        if request.state is not State.RESERVING:  # answered (timed out) meanwhile
            return [GiveBack(worker.worker_id)] if worker is not None else []
        if worker is None:
            if reservation.capable or now < request.patient_until:
                return self._wait(request)
            return [self._answer(request, *unavailable(request, reservation))]
        request.state = State.PLACED
        request.retry_safe = request.command not in worker.no_retry
        actions: list[Action] = [self._place(request, worker, reservation.why, now)]
        return actions + request.hedging_on(worker, self.hedges, now)

    def _place(self, request: Request, worker: WorkerEntry, why: str, now: float) -> Forward:
        request.placements.append(Placement(worker.worker_id, worker.connection, worker.inbox))
        request.tried.append(worker.worker_id)
        request.placed = request.placed or now
        if why and len(request.routing) < MAX_ROUTING_CHARS:
            request.routing = (f"{request.routing} | {why}" if request.routing
                               else why)[:MAX_ROUTING_CHARS]
        return Forward(request, worker, max(0.001, request.deadline - now))

    def hedge_due(self, key: str) -> list[Action]:
        """Its hedge delay passed: if it is still with its one worker and the budget
        allows, reserve a second worker for a copy."""
        request = self.requests.get(key)
        if request is None or request.state is not State.PLACED or \
                request.hedging is not Hedge.ARMED or not self.hedges.spend():
            return []
        request.hedging = Hedge.RESERVING
        return [Reserve([request])]

    def _hedge_reserved(self, request: Request, reservation: Reservation, now: float
                        ) -> list[Action]:
        """The slot for a second copy: taken (forward it), or none free (no hedge)."""
        request.hedging = Hedge.ARMED
        worker = reservation.worker
        self.stats["hedges_unplaced"] += worker is None
        if request.state is State.RESERVING:  # its worker was lost meanwhile: a retry
            return self.reserved(request, reservation, now)
        if worker is None:
            return []
        if request.state is not State.PLACED or request.command in worker.no_retry:
            # Answered meanwhile; or that worker says the command must not run twice.
            self.stats["hedges_unplaced"] += request.state is State.PLACED
            return [GiveBack(worker.worker_id)]
        request.hedging = Hedge.SENT
        self.stats["hedged"] += 1
        return [self._place(request, worker, reservation.why, now)]

    def replied(self, key: str, worker_id: str, success: bool, data: Any,
                error: str | None, code: str | None, latency_ms: float | None = None
                ) -> list[Action]:
        """The worker's answer; dropped (and counted) unless the request is placed there.
        A hedged request's other copy is cancelled."""
        request = self._placed(key, worker_id)
        if request is None:
            self.stats["late"] += 1
            return []
        if request.hedging in (Hedge.ARMED, Hedge.RESERVING) and latency_ms is not None:
            self.hedges.record(request.command, latency_ms)
        actions: list[Action] = [
            CancelOnWorker(request, protocol.ANSWERED_ELSEWHERE, p)
            for p in request.placements if p.worker_id != worker_id]
        if success:
            response = ApiResponse(request.request_id, True, data, None, worker_id)
        else:
            response = ApiResponse.failure(request.request_id, error or "Request failed",
                                           ErrorCode.of(code, ErrorCode.WORKER_ERROR),
                                           worker_id)  # its link vetted a worker's code
        return [*actions, self._finish(request, response)]

    def failed_on(self, key: str, worker_id: str, error: str, code: ErrorCode
                  ) -> list[Action]:
        """The broker could not hand it to (or take it back from) the worker: give the
        slot back and answer with why."""
        request = self._placed(key, worker_id)
        if request is None:
            return []
        if self._unplace(request, worker_id):  # its other copy goes on
            return [GiveBack(worker_id)]
        return [GiveBack(worker_id), self._answer(request, error, code)]

    def lost(self, key: str, worker_id: str, reason: str,
             code: ErrorCode = ErrorCode.WORKER_LOST) -> list[Action]:
        """Its worker went away (or hung past its lease, ``code`` lease_expired): send it
        to another, or answer why not."""
        request = self._placed(key, worker_id)
        if request is None:
            return []
        self.stats["lost"] += 1
        request.workers_lost += 1
        request.lost_because, request.lost_code = reason, code
        request.lost_from.append(worker_id)
        if code is ErrorCode.LEASE_EXPIRED:
            request.hung_on.append(worker_id)
        if self._unplace(request, worker_id):  # its other copy goes on
            return []
        lost = request.lost_text
        if request.target is not None:  # a named worker: nowhere else to go
            return [self._answer(request, lost, code)]
        if not request.retry_safe:
            return [self._answer(request, f"{lost}; '{request.command}' is not "
                                          "idempotent, so it was not retried", code)]
        if request.workers_lost > conf.get("MAX_RETRIES"):
            return [self._answer(request, f"{lost} after {request.attempts} attempts",
                                 code)]
        self.stats["redispatched"] += 1
        request.state = State.RESERVING
        if request.hedging is Hedge.RESERVING:  # the slot reserved for its copy will do
            return []
        return [Reserve([request])]

    def expired(self, key: str) -> list[Action]:
        request = self.requests.get(key)
        if request is None:
            return []
        self.stats["timeouts"] += 1
        # A worker that has it keeps its slot until it answers or the slot expires there.
        return [self._answer(request, protocol.TIMEOUT, ErrorCode.TIMEOUT)]

    def cancel(self, key: str, reason: str) -> list[Action]:
        """Answered ``cancelled`` now; a worker that has it is told to stop it."""
        request = self.requests.get(key)
        if request is None:
            return []
        self.stats["cancelled"] += 1
        actions: list[Action] = [CancelOnWorker(request, reason, p)
                                 for p in request.placements]
        actions.append(self._answer(request, f"{protocol.CANCELLED}: {reason}",
                                    ErrorCode.CANCELLED))
        return actions

    def progress(self, key: str, worker_id: str, value: float | None,
                 message: str | None) -> list[Action]:
        """Its worker says how far it got: for the watchers that asked."""
        request = self._placed(key, worker_id)
        if request is not None and (value is not None or message is not None):
            request.reported = (value, message)  # not a bare heartbeat: the dashboard's
        if request is None or not request.stream:
            return []
        fields = {name: v for name, v in (("progress", value), ("message", message))
                  if v is not None}
        return [Notify(request, protocol.event(request.request_id, "progress", **fields),
                       mergeable=True)]

    def chunk(self, key: str, worker_id: str, seq: int, data: Any, ack: Any) -> list[Action]:
        """One partial result: for the watchers that asked (it is acknowledged when one
        of them took it, or at once if none wants it)."""
        request = self._placed(key, worker_id)
        if request is None:
            return []
        return [Notify(request, protocol.event(request.request_id, "chunk", seq=seq,
                                               data=data), ack)]

    def watch(self, key: str, sink: Sink, stream: bool) -> bool:
        """Add a watcher (an attach; one per sink); False if the request is not here."""
        request = self.requests.get(key)
        if request is None:
            return False
        request.watchers = [*(w for w in request.watchers if w.sink is not sink),
                            Watcher(sink, stream)]
        return True

    def unwatch(self, keys: Iterable[str], sink: Sink) -> None:
        """The watcher left (its connection closed): the requests go on without it."""
        for key in keys:
            request = self.requests.get(key)
            if request is not None:
                request.watchers = [w for w in request.watchers if w.sink is not sink]

    def placed(self) -> list[Request]:
        """Requests that are with a worker (to check that their workers still live)."""
        return [r for r in self.requests.values() if r.state is State.PLACED]

    def stop(self) -> list[Action]:
        """Shutting down: no new requests; whatever is left is answered now."""
        self.accepting = False
        return [self._answer(r, protocol.SHUTTING_DOWN, ErrorCode.SHUTTING_DOWN)
                for r in list(self.requests.values())]

    # ------------------------------------------------------------------ helpers

    def _placed(self, key: str, worker_id: str) -> Request | None:
        request = self.requests.get(key)
        if request is None or request.state is not State.PLACED or \
                all(p.worker_id != worker_id for p in request.placements):
            return None
        return request

    @staticmethod
    def _unplace(request: Request, worker_id: str) -> bool:
        """Forget one placement; True if another is left (a hedge's twin)."""
        request.placements = [p for p in request.placements if p.worker_id != worker_id]
        return bool(request.placements)

    def _answer(self, request: Request, error: str, code: ErrorCode) -> Answer:
        return self._finish(request, ApiResponse.failure(request.request_id, error, code))

    def _finish(self, request: Request, response: ApiResponse) -> Answer:
        """The only way out of the table: once per request."""
        response.route = request.route()
        if self.requests.pop(request.key, None) is not None:
            self.held.remove(request.owner, request.cost)
        name = (request.owner, request.request_id)
        if self.named.get(name) == request.key:
            del self.named[name]
        request.state = State.DONE
        self.stats["answered"] += 1
        return Answer(request, response)


def unavailable(request: Request, reservation: Reservation) -> tuple[str, ErrorCode]:
    """Why no worker could be reserved for ``request``, in the words of what was tried."""
    lost = request.lost_text
    if request.target is not None:
        if request.attempts:
            return lost, request.lost_code
        return f"Unknown worker '{protocol.quote(request.target)}'", ErrorCode.UNKNOWN_WORKER
    if request.attempts:
        return f"{lost} and no other worker offers '{request.command}'", request.lost_code
    if reservation.unmatched:
        return (f"{protocol.NO_WORKERS}: no worker offering "
                f"'{protocol.quote(request.command)}' has "
                f"{protocol.quote(reservation.unmatched)}", ErrorCode.NO_WORKERS)
    return protocol.NO_WORKERS, ErrorCode.NO_WORKERS


def over_limits(not_before: float | None, keep: float | None) -> str | None:
    """What a queued job asks beyond this broker's limits (MAX_DEFER, MAX_KEEP), if
    anything: a job deferred for years, or kept for a year, holds its row that long."""
    if not_before is not None and not_before - time.time() > conf.get("MAX_DEFER"):
        return (f"Field 'not_before' is over this broker's limit of "
                f"{conf.get('MAX_DEFER'):g} seconds ahead")
    if keep is not None and keep > conf.get("MAX_KEEP"):
        return f"Field 'keep' is over this broker's limit of {conf.get('MAX_KEEP'):g} seconds"
    return None
