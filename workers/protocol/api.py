"""The requester API spoken on the requester socket: ``{"request_id", "command",
"data"}`` answered by ``{"request_id", "success", "data", "error", "processed_by"}``,
plus the cancel and attach frames and the events of a streamed request.

It is the seed's plain JSON, without the worker socket's envelope, so that any
WebSocket client can send requests; what a request may add is optional.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from .codec import dumps, loads_object
from .codes import ErrorCode
from .errors import ProtocolError
from .fields import MAX_ID_CHARS, MAX_NAME_CHARS, MAX_PROTOCOL_TIMEOUT, _field, _text
from .labels import parse_labels
from .text import quote
from .traceparent import parse_traceparent

#: Priorities a request may carry; higher is served first, 0 when it names none.
PRIORITIES = range(0, 10)


@dataclass(slots=True)
class ApiRequest:
    """``{"request_id", "command", "data"}``, plus optional ``timeout`` (seconds),
    ``stream`` (send progress and chunk events before the answer), ``priority`` (0-9,
    higher first), ``select`` (labels its worker must have), ``affinity`` (a key:
    requests with one key go to one worker), ``hedge``, ``traceparent`` (a W3C
    trace context, passed on to the worker and given back in the answer; one that is
    not well formed is ignored, as the W3C recommendation says, never refused) and
    ``accepted`` (send an ``accepted`` event once the broker has stored the request, so
    that no broker restart or crash can lose it; an answer that comes sooner is sent once
    the request is stored, instead of it), and
    for queued jobs ``not_before``, ``wait_for_workers``, ``keep`` and ``task``."""

    command: str
    data: dict[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timeout: float | None = None
    stream: bool = False
    priority: int = 0
    select: dict[str, str] = field(default_factory=dict)  # labels the worker must have
    affinity: str | None = None  # requests with one key go to one worker
    hedge: bool = False  # may be sent to a second worker when the first is slow
    traceparent: str | None = None
    accepted: bool = False  # wants an "accepted" event once the request is stored
    #: Deferred: not given to a worker before this moment (unix seconds); its timeout
    #: counts from then.
    not_before: float | None = None
    #: No worker offers the command now: wait for one (until its timeout) instead of
    #: failing no_workers. Queued jobs (Django tasks) want this.
    wait_for_workers: bool = False
    keep: float | None = None  # seconds its answer is kept (if longer than RESULT_TTL)
    task: str | None = None  # the Django task it runs (module path): a label for get_result

    def to_json(self) -> str:
        obj: dict[str, Any] = {"request_id": self.request_id, "command": self.command,
                               "data": self.data}
        if self.timeout is not None:
            obj["timeout"] = self.timeout
        for name in ("stream", "priority", "select", "affinity", "hedge", "traceparent",
                     "accepted", "not_before", "wait_for_workers", "keep", "task"):
            if getattr(self, name):
                obj[name] = getattr(self, name)
        return dumps(obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiRequest:
        """Parse a request; a request without ``request_id`` is given one."""
        return cls.from_dict(loads_object(text))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ApiRequest:
        rid = _text(obj, "request_id", MAX_ID_CHARS, None) or str(uuid.uuid4())
        if not rid.isprintable():
            raise ProtocolError(f"Field 'request_id' must be printable text, got "
                                f"'{quote(rid, 40)}'")
        command = _text(obj, "command", MAX_NAME_CHARS, request_id=rid)
        if not command:
            raise ProtocolError("Field 'command' must not be empty", request_id=rid)
        if not command.isprintable():
            raise ProtocolError(f"Field 'command' must be printable text, got "
                                f"'{quote(command, 40)}'", request_id=rid)
        timeout = _field(obj, "timeout", (int, float), None, request_id=rid)
        if timeout is not None and not 0 < timeout <= MAX_PROTOCOL_TIMEOUT:
            raise ProtocolError(f"Field 'timeout' must be between 0 and "
                                f"{MAX_PROTOCOL_TIMEOUT} seconds", request_id=rid)
        priority = _field(obj, "priority", int, 0, request_id=rid)
        if priority not in PRIORITIES:
            raise ProtocolError(f"Field 'priority' must be from {PRIORITIES.start} to "
                                f"{PRIORITIES.stop - 1}", request_id=rid)
        try:
            select = parse_labels(obj.get("select"), "select")
        except ProtocolError as exc:
            raise ProtocolError(str(exc), request_id=rid) from None
        return cls(command=command, data=_field(obj, "data", dict, {}, request_id=rid),
                   request_id=rid, timeout=None if timeout is None else float(timeout),
                   stream=_field(obj, "stream", bool, False, request_id=rid),
                   priority=priority, select=select,
                   affinity=_text(obj, "affinity", MAX_ID_CHARS, None, request_id=rid),
                   hedge=_field(obj, "hedge", bool, False, request_id=rid),
                   traceparent=parse_traceparent(obj.get("traceparent")),
                   accepted=_field(obj, "accepted", bool, False, request_id=rid),
                   not_before=_seconds(obj, "not_before", MAX_UNIX_TIME, rid),
                   wait_for_workers=_field(obj, "wait_for_workers", bool, False,
                                           request_id=rid),
                   keep=_seconds(obj, "keep", MAX_KEEP, rid),
                   task=_printable(obj, "task", rid))


#: The latest ``not_before`` taken (the year 2286), and the longest ``keep`` (a year).
MAX_UNIX_TIME = 1e10
MAX_KEEP = 366 * 86400


def _seconds(obj: dict[str, Any], name: str, limit: float, rid: str) -> float | None:
    value = _field(obj, name, (int, float), None, request_id=rid)
    if value is not None and not 0 <= value <= limit:
        raise ProtocolError(f"Field '{name}' must be between 0 and {limit:g} seconds",
                            request_id=rid)
    return None if value is None else float(value)


def _printable(obj: dict[str, Any], name: str, rid: str) -> str | None:
    value = _text(obj, name, MAX_NAME_CHARS, None, request_id=rid)
    if value is not None and not value.isprintable():
        raise ProtocolError(f"Field '{name}' must be printable text, got "
                            f"'{quote(value, 40)}'", request_id=rid)
    return value


@dataclass(slots=True)
class Cancel:
    """``{"cancel": "<request_id>"}``: stop a request of this connection's credential."""

    request_id: str


@dataclass(slots=True)
class Attach:
    """``{"attach": "<request_id>", "stream": bool}``: get a request's answer (and, with
    ``stream``, its remaining progress), whichever connection of the credential sent it."""

    request_id: str
    stream: bool = False


def requester_frame(text: str | bytes) -> ApiRequest | Cancel | Attach:
    """Any frame of the requester socket: a request, or a cancel or attach of one."""
    return requester_object(loads_object(text))


def requester_object(obj: dict[str, Any]) -> ApiRequest | Cancel | Attach:
    """A request, cancel or attach: alone in its frame, or one of a batch."""
    for name, kind in (("cancel", Cancel), ("attach", Attach)):
        if name in obj:
            rid = _text(obj, name, MAX_ID_CHARS)
            if not rid:
                raise ProtocolError(f"Field '{name}' must name a request_id")
            if kind is Attach:
                return Attach(rid, _field(obj, "stream", bool, False, request_id=rid))
            return Cancel(rid)
    return ApiRequest.from_dict(obj)


def event(request_id: str, kind: str, **fields: Any) -> str:
    """A progress or chunk event for a request that asked for ``stream``:
    ``{"request_id", "event": "progress"|"chunk", ...}``; never mistaken for the answer
    (it has no ``success``)."""
    return dumps({"request_id": request_id, "event": kind, **fields})


#: Fields of an answer that say how it was routed (when there is something to say).
ROUTE_FIELDS = ("attempts", "failover_from", "hedged", "traceparent")


@dataclass(slots=True)
class ApiResponse:
    """``{"request_id", "success", "data", "error", "processed_by"}``, and on failure
    ``"code"`` (an :class:`ErrorCode`)."""

    request_id: str | None
    success: bool
    data: Any = None
    error: str | None = None
    processed_by: str | None = None
    code: str | None = None
    #: What happened on the way, when it is worth saying (the seed's clients ignore it):
    #: ``{"attempts": 2, "failover_from": ["w1"], "hedged": true}``, and the request's
    #: ``traceparent`` if it had one.
    route: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"request_id": self.request_id, "success": self.success, "data": self.data,
               "error": self.error, "processed_by": self.processed_by}
        if self.code is not None:
            out["code"] = self.code
        if self.route:
            out.update(self.route)
        return out

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def failure(cls, request_id: str | None, error: str, code: ErrorCode,
                processed_by: str | None = None) -> ApiResponse:
        return cls(request_id, False, None, error, processed_by, code.value)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiResponse:
        return cls.from_dict(loads_object(text))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ApiResponse:
        return cls(
            request_id=_field(obj, "request_id", str, None),
            success=_field(obj, "success", bool),
            data=obj.get("data"),
            error=_field(obj, "error", str, None),
            processed_by=_field(obj, "processed_by", str, None),
            code=_field(obj, "code", str, None),
            route={k: obj[k] for k in ROUTE_FIELDS if k in obj} or None,
        )
