"""What the worker and requester clients raise: one class per way a request fails.

``RequestFailed`` is the base of every failure answer; its subclasses follow the
broker's :class:`~workers.protocol.ErrorCode` (``NoWorkers`` for ``no_workers``...),
so callers can catch the ones they can act on, as nats.py does with
``NoRespondersError``::

    try:
        await broker.call("resize", url=url)
    except NoWorkers:
        ...  # start a worker, or try later
    except CommandFailed as exc:
        print(exc.code, exc.error)  # the handler said no

An answer from a broker that sends no code raises ``RequestFailed`` itself.
"""

from __future__ import annotations

from typing import Any

from .protocol import ErrorCode


def describe(exc: BaseException) -> str:
    """One line naming an exception, for logs and error messages."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RequestFailed(Exception):
    """A request was answered, and the answer says it failed.

    ``error`` is the text the broker or worker gave, ``code`` its ErrorCode value
    (or None), ``response`` the whole answer (an :class:`~workers.protocol.ApiResponse`,
    or a :class:`~workers.protocol.ResponseBody` when raised by ``Worker.request``).
    """

    #: The codes this class stands for (the base: any).
    codes: frozenset[ErrorCode] = frozenset()

    def __init__(self, error: str, response: Any = None, code: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.response = response
        self.code = code

    @classmethod
    def from_answer(cls, error: str | None, code: str | None, response: Any = None
                    ) -> RequestFailed:
        """The exception of the class that stands for ``code``."""
        kind = _BY_CODE.get(code or "", RequestFailed)
        return kind(error or "Request failed", response, code)


class NoWorkers(RequestFailed):
    """No online worker offers the command (or the named worker is unknown)."""

    codes = frozenset({ErrorCode.NO_WORKERS, ErrorCode.UNKNOWN_WORKER})


class AllBusy(RequestFailed):
    """Every capable worker is full and the broker's wait queue too."""

    codes = frozenset({ErrorCode.ALL_BUSY})


class Timeout(RequestFailed):
    """No answer within the request's timeout (the broker said so)."""

    codes = frozenset({ErrorCode.TIMEOUT})


class WorkerLost(RequestFailed):
    """Its worker went away (or hung past its lease), and the request could not be sent
    to another."""

    codes = frozenset({ErrorCode.WORKER_LOST, ErrorCode.LEASE_EXPIRED})


class Cancelled(RequestFailed):
    """The request was cancelled (by this client, another connection of its
    credential, or an operator)."""

    codes = frozenset({ErrorCode.CANCELLED})


class BrokerUnavailable(RequestFailed):
    """The broker could not route it now: its Redis is down, it is overloaded or
    stopping. Worth retrying later."""

    codes = frozenset({ErrorCode.BROKER_UNAVAILABLE, ErrorCode.OVERLOADED,
                       ErrorCode.SHUTTING_DOWN})


class Refused(RequestFailed):
    """The broker refused the request itself: malformed, too large, not allowed,
    over a limit, a duplicate id."""

    codes = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.UNAUTHORIZED,
                       ErrorCode.NOT_ALLOWED, ErrorCode.LIMIT_EXCEEDED,
                       ErrorCode.DUPLICATE, ErrorCode.NOT_HOLDING,
                       ErrorCode.UNKNOWN_REQUEST})


class CommandFailed(RequestFailed):
    """The worker ran the command and it failed (its handler's own error, bad
    parameters, an unknown command, a crash in the handler)."""

    codes = frozenset({ErrorCode.COMMAND_ERROR, ErrorCode.BAD_PARAMS,
                       ErrorCode.UNKNOWN_COMMAND, ErrorCode.HANDLER_FAILED,
                       ErrorCode.NOT_SERIALIZABLE, ErrorCode.WORKER_STOPPING,
                       ErrorCode.WORKER_ERROR})


_BY_CODE: dict[str, type[RequestFailed]] = {
    code.value: kind for kind in (NoWorkers, AllBusy, Timeout, WorkerLost, Cancelled,
                                  BrokerUnavailable, Refused, CommandFailed)
    for code in kind.codes}


class ConnectionLost(ConnectionError):
    """The connection to the broker is gone, so an answer can no longer arrive."""


class RegistrationFailed(Exception):
    """The broker answered our ``connect`` frame with an ``error``, or not at all.

    ``close_code`` is the code the broker closed with, when it did (4409: the worker
    id belongs to another credential); ``code`` the error code of its answer.
    """

    def __init__(self, reason: str, close_code: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.code = code


__all__ = ["AllBusy", "BrokerUnavailable", "Cancelled", "CommandFailed", "ConnectionLost",
           "NoWorkers", "Refused", "RegistrationFailed", "RequestFailed", "Timeout", "WorkerLost",
           "describe"]
