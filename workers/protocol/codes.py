"""What a failure is called: error codes for programs, error texts for people, and
the WebSocket close codes.

The broker, the workers and both clients name failures with these, so a code or a
text never means one thing on one side and another on the other.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import Any


class ErrorCode(str, Enum):
    """Why a request failed: the ``code`` beside the ``error`` text of a failed answer.

    The text is for people and may carry details; the code is for programs (clients
    raise one exception class per code; metrics count by it). A worker's error frame
    carries one too. Seed clients ignore the field.
    """

    # The broker could not get it done.
    NO_WORKERS = "no_workers"  # no online worker offers the command
    ALL_BUSY = "all_busy"  # every capable worker is full and the wait queue too
    TIMEOUT = "timeout"  # no answer within the request's timeout
    WORKER_LOST = "worker_lost"  # its worker went away and it could not be re-sent
    BROKER_UNAVAILABLE = "broker_unavailable"  # Redis (registry or layer) unreachable
    OVERLOADED = "overloaded"  # an inbox between broker processes is full
    SHUTTING_DOWN = "shutting_down"  # the broker is stopping
    CANCELLED = "cancelled"  # the requester (or an operator) cancelled it
    LEASE_EXPIRED = "lease_expired"  # a leased job showed no life for its lease period
    # The request (or frame) was refused.
    BAD_REQUEST = "bad_request"  # malformed JSON, missing or wrong-typed fields
    TOO_LARGE = "too_large"  # over MAX_MESSAGE_BYTES (the request, or the worker's answer)
    UNAUTHORIZED = "unauthorized"  # no valid credential for this socket
    NOT_ALLOWED = "not_allowed"  # the credential does not allow this command
    LIMIT_EXCEEDED = "limit_exceeded"  # too many (or too large) requests in flight, rate
    DUPLICATE = "duplicate"  # a request with this request_id is still in flight
    UNKNOWN_WORKER = "unknown_worker"  # ``send`` to a worker id nobody registered
    NOT_HOLDING = "not_holding"  # (worker socket) an answer to a request it does not hold
    UNKNOWN_REQUEST = "unknown_request"  # cancel or attach of a request nobody holds
    # The worker ran it, and it failed.
    COMMAND_ERROR = "command_error"  # the handler raised CommandError: the text is its own
    BAD_PARAMS = "bad_params"  # the data does not fit the handler's parameters
    UNKNOWN_COMMAND = "unknown_command"  # the worker has no such command
    HANDLER_FAILED = "handler_failed"  # the handler raised something unexpected
    NOT_SERIALIZABLE = "not_serializable"  # the result cannot be sent as JSON
    WORKER_STOPPING = "worker_stopping"  # the worker stopped before it finished
    WORKER_ERROR = "worker_error"  # a failure from a worker that gives no code

    @classmethod
    def from_worker(cls, value: Any) -> ErrorCode:
        """The code of a worker's failed answer: one of those a worker may give
        (:data:`WORKER_ANSWER_CODES`), else WORKER_ERROR. A worker cannot pass its
        failure off as the broker's (``broker_unavailable`` reads as worth retrying,
        ``timeout`` or ``no_workers`` would mislead alerts)."""
        code = cls.of(value, cls.WORKER_ERROR)
        return code if code in WORKER_ANSWER_CODES else cls.WORKER_ERROR

    @classmethod
    def of(cls, value: Any, default: ErrorCode) -> ErrorCode:
        """The code named by a peer's ``code`` field; ``default`` for one we do not know."""
        try:
            return cls(value)
        except ValueError:
            return default


#: The codes a worker's failed answer may carry: it ran the command and it failed. (A
#: cancel is answered by the broker; the worker's confirmation only frees the slot.)
WORKER_ANSWER_CODES = frozenset({
    ErrorCode.COMMAND_ERROR, ErrorCode.BAD_PARAMS, ErrorCode.UNKNOWN_COMMAND,
    ErrorCode.HANDLER_FAILED, ErrorCode.NOT_SERIALIZABLE, ErrorCode.WORKER_STOPPING,
    ErrorCode.WORKER_ERROR})


# Error texts a requester sees; the first two are the seed's own wording.
NO_WORKERS = "No available workers"
TIMEOUT = "Worker response timeout"
WORKER_LOST = "Worker lost"
ALL_BUSY = "All workers busy"
BROKER_OVERLOADED = "Broker overloaded"
SHUTTING_DOWN = "Broker shutting down"
CANCELLED = "Cancelled"
LEASE_EXPIRED = "Lease expired"
BROKER_UNAVAILABLE = "Broker unavailable"
ANSWER_TOO_LARGE = "Worker answer too large"
#: The reason a hedged request's slower copy is cancelled with.
ANSWERED_ELSEWHERE = "answered by another worker"


class CloseCode(IntEnum):
    """WebSocket close codes the broker sends.

    All in 4000-4999, the application's range: daphne's WebSocket library lets a
    server send only 1000 and 3000-4999 (it raises for 1001, 1008, 1013). Where a
    standard code means the same, the last digits echo it (4008 ~ 1008, 4013 ~
    1013); the 44xx codes echo the HTTP status of the same meaning.
    """

    SHUTTING_DOWN = 4000  # the broker is going away: reconnect later
    REPLACED = 4001  # a newer connection registered the same worker id
    BAD_REGISTRATION = 4002  # the connect frame was refused, or never came
    HEARTBEAT_TIMEOUT = 4003  # silent, or not answering pings
    RATE_LIMITED = 4008  # faster than RATE_LIMIT frames per second
    TOO_SLOW = 4009  # what waits for this peer to read passed MAX_UNSENT_BYTES
    TRY_AGAIN_LATER = 4013  # the shared registry is unreachable: retry with backoff
    UNAUTHORIZED = 4401  # no token, a bad one, or a revoked one
    FORBIDDEN = 4403  # wrong kind of credential, origin not allowed, remote in protected mode
    NO_SUCH_ENDPOINT = 4404  # no socket at this path and port
    WORKER_ID_TAKEN = 4409  # the worker id belongs to another credential
    TOO_MANY_CONNECTIONS = 4429  # the credential's connection limit
