"""The request table: every request this process has yet to answer, without any I/O.

Like the ``Protocol`` of python-websockets, it never awaits and never touches a
socket: the driver (:class:`dispatch.core.dispatcher.Dispatcher`) feeds it what
happened (a request arrived, a slot was reserved, a worker answered, a worker was
lost, a deadline passed) and performs the actions it returns (reserve slots,
forward to a worker, give a slot back, answer a requester). So every rule about a
request's life lives here, in one place, and tests drive it with a fake clock:

* submitted -> reserving -> placed (on a worker) -> answered;
* no capable worker: answered at once; all capable workers full: waiting, in a
  bounded queue, reserved again when a slot may have freed;
* the worker lost: reserving again, at most ``MAX_RETRIES`` times and only if its
  command may run twice (``no_retry``); else answered ``worker_lost``;
* the deadline passed, anywhere: answered ``timeout``;
* every request is answered exactly once; an answer for a request no longer
  placed on that worker (late, duplicate, forged) is dropped and counted.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from workers import protocol
from workers.protocol import ApiResponse, ErrorCode

from .. import conf
from ..registry import Reservation, WorkerEntry

Respond = Callable[[ApiResponse], Awaitable[None]]


class State(enum.Enum):
    RESERVING = "reserving"  # a slot is being reserved for it
    WAITING = "waiting"  # every capable worker is full: queued
    PLACED = "placed"  # forwarded to a worker, which has yet to answer
    DONE = "done"  # answered (or abandoned): nothing more happens to it


@dataclass(slots=True, eq=False)
class Request:
    """One request this process has yet to answer."""

    key: str  # its name inside the broker (request ids are the requesters' own)
    command: str
    data: dict[str, Any]
    respond: Respond
    request_id: str
    requester: str
    deadline: float  # event-loop time
    started: float  # wall time, for history
    target: str | None = None  # a worker chosen by the caller (broker -> worker `send`)
    state: State = State.RESERVING
    worker_id: str | None = None  # the worker it is placed on
    worker_channel: str = ""  # that worker's connection, to notice a reconnect elsewhere
    retry_safe: bool = True  # False: the worker said this command must not run twice
    lost_because: str = ""  # why its last worker was lost, for the error text
    attempts: int = 0
    timer: Any = None  # the driver's deadline timer


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
class Drop:
    """The requester left: stop the timer; nobody is answered."""

    request: Request


Action = Arm | Reserve | Forward | GiveBack | Answer | Drop


# ---------------------------------------------------------------------------- the table


@dataclass
class RequestTable:
    """The requests of one broker process, from arrival to answer."""

    requests: dict[str, Request] = field(default_factory=dict)
    waiting: deque[Request] = field(default_factory=deque)
    stats: Counter[str] = field(default_factory=Counter)
    accepting: bool = True

    def __len__(self) -> int:
        return len(self.requests)

    def submit(self, request: Request) -> list[Action]:
        if not self.accepting:
            return [self._answer(request, protocol.SHUTTING_DOWN, ErrorCode.SHUTTING_DOWN)]
        self.requests[request.key] = request
        self.stats["submitted"] += 1
        return [Arm(request), Reserve([request])]

    def reserved(self, request: Request, reservation: Reservation, now: float
                 ) -> list[Action]:
        """The registry's answer for a request that was being reserved."""
        worker = reservation.worker
        if request.state is not State.RESERVING:  # answered (timed out) meanwhile
            return [GiveBack(worker.worker_id)] if worker is not None else []
        if worker is not None:
            request.state = State.PLACED
            request.worker_id = worker.worker_id
            request.worker_channel = worker.channel
            request.retry_safe = request.command not in worker.no_retry
            request.attempts += 1
            return [Forward(request, worker, max(0.001, request.deadline - now))]
        if reservation.capable:
            if len(self.waiting) >= conf.get("QUEUE_LIMIT"):
                self.stats["queue_full"] += 1
                return [self._answer(request, protocol.ALL_BUSY, ErrorCode.ALL_BUSY)]
            request.state = State.WAITING
            self.waiting.append(request)
            return []
        return [self._unavailable(request)]

    def reservation_failed(self, requests: Iterable[Request], reason: str) -> list[Action]:
        """The registry could not be asked (Redis down): each of them is answered."""
        return [self._answer(r, f"{protocol.BROKER_UNAVAILABLE}: {reason}",
                             ErrorCode.BROKER_UNAVAILABLE)
                for r in requests if r.state is State.RESERVING]

    def take_waiting(self) -> list[Request]:
        """The queued requests, to be reserved again (a slot may have freed)."""
        batch = [r for r in self.waiting if r.state is State.WAITING]
        self.waiting.clear()
        for request in batch:
            request.state = State.RESERVING
        return batch

    def replied(self, key: str, worker_id: str, success: bool, data: Any,
                error: str | None, code: str | None) -> list[Action]:
        """The worker's answer; dropped (and counted) unless the request is placed there."""
        request = self._placed(key, worker_id)
        if request is None:
            self.stats["late"] += 1
            return []
        if success:
            return [self._finish(request, ApiResponse(request.request_id, True, data, None,
                                                      worker_id))]
        return [self._finish(request, ApiResponse.failure(
            request.request_id, error or "Request failed",
            ErrorCode.of(code, ErrorCode.WORKER_ERROR), worker_id))]

    def failed_on(self, key: str, worker_id: str, error: str, code: ErrorCode
                  ) -> list[Action]:
        """The broker could not hand it to (or take it back from) the worker: give the
        slot back and answer with why."""
        request = self._placed(key, worker_id)
        if request is None:
            return []
        return [GiveBack(worker_id), self._answer(request, error, code)]

    def lost(self, key: str, worker_id: str, reason: str) -> list[Action]:
        """Its worker went away: send it to another, or answer why not."""
        request = self._placed(key, worker_id)
        if request is None:
            return []
        self.stats["lost"] += 1
        request.worker_id = None
        request.lost_because = reason
        if not request.retry_safe:
            return [self._answer(request, f"{protocol.WORKER_LOST} ({reason}); "
                                          f"'{request.command}' is not idempotent, so it was "
                                          "not retried", ErrorCode.WORKER_LOST)]
        if request.attempts > conf.get("MAX_RETRIES"):
            return [self._answer(request, f"{protocol.WORKER_LOST} ({reason}) after "
                                          f"{request.attempts} attempts",
                                 ErrorCode.WORKER_LOST)]
        self.stats["redispatched"] += 1
        request.state = State.RESERVING
        return [Reserve([request])]

    def expired(self, key: str) -> list[Action]:
        request = self.requests.get(key)
        if request is None:
            return []
        self.stats["timeouts"] += 1
        # A worker that has it keeps its slot until it answers or the slot expires there.
        return [self._answer(request, protocol.TIMEOUT, ErrorCode.TIMEOUT)]

    def abandon(self, keys: Iterable[str]) -> list[Action]:
        """The requester left: forget its requests; late answers will be dropped."""
        out: list[Action] = []
        for key in keys:
            request = self.requests.pop(key, None)
            if request is not None:
                request.state = State.DONE
                out.append(Drop(request))
        return out

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
                request.worker_id != worker_id:
            return None
        return request

    def _unavailable(self, request: Request) -> Answer:
        """Why no worker could be reserved, in the words of what was tried."""
        lost = f"{protocol.WORKER_LOST} ({request.lost_because})"
        if request.target is not None:
            if request.attempts:
                return self._answer(request, lost, ErrorCode.WORKER_LOST)
            return self._answer(request, f"Unknown worker '{protocol.quote(request.target)}'",
                                ErrorCode.UNKNOWN_WORKER)
        if request.attempts:
            return self._answer(request, f"{lost} and no other worker offers "
                                         f"'{request.command}'", ErrorCode.WORKER_LOST)
        return self._answer(request, protocol.NO_WORKERS, ErrorCode.NO_WORKERS)

    def _answer(self, request: Request, error: str, code: ErrorCode) -> Answer:
        return self._finish(request, ApiResponse.failure(request.request_id, error, code))

    def _finish(self, request: Request, response: ApiResponse) -> Answer:
        """The only way out of the table: once per request."""
        self.requests.pop(request.key, None)
        request.state = State.DONE
        self.stats["answered"] += 1
        return Answer(request, response)
