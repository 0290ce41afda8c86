"""The ``data`` of the envelopes that carry a request's life (``request``,
``response``, ``progress``, ``chunk``), each read into a checked dataclass.

Apart from :mod:`workers.protocol.envelope` because the envelope is generic (any type,
any data) and these are the few bodies both sides must read alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .envelope import Message
from .errors import ProtocolError
from .fields import MAX_ID_CHARS, MAX_NAME_CHARS, _field, _text
from .traceparent import parse_traceparent

#: Characters of a progress message passed on.
MAX_PROGRESS_MESSAGE = 1000


@dataclass(slots=True)
class RequestBody:
    """The ``data`` of a ``request`` envelope: ``{"action", "params"}``, and from the
    broker ``time_left`` (seconds until the request's deadline) and ``stream`` (the
    requester wants progress and chunks) and ``traceparent`` (the requester's W3C trace
    context); a worker of the seed's ignores them."""

    action: str
    params: dict[str, Any]
    time_left: float | None = None
    stream: bool = False
    traceparent: str | None = None

    @classmethod
    def from_message(cls, msg: Message) -> RequestBody:
        action = _text(msg.data, "action", MAX_NAME_CHARS, request_id=msg.msg_id)
        if not action:
            raise ProtocolError("Field 'action' must not be empty", request_id=msg.msg_id)
        time_left = _field(msg.data, "time_left", (int, float), None, request_id=msg.msg_id)
        return cls(action, _field(msg.data, "params", dict, {}, request_id=msg.msg_id),
                   None if time_left is None else float(time_left),
                   _field(msg.data, "stream", bool, False, request_id=msg.msg_id),
                   parse_traceparent(msg.data.get("traceparent")))


@dataclass(slots=True)
class ResponseBody:
    """The ``data`` of a ``response`` envelope; ``code`` is optional (an ErrorCode)."""

    request_id: str
    success: bool
    data: Any = None
    error: str | None = None
    code: str | None = None

    @classmethod
    def from_message(cls, msg: Message) -> ResponseBody:
        d = msg.data
        return cls(
            request_id=_text(d, "request_id", MAX_ID_CHARS),
            success=_field(d, "success", bool),
            data=d.get("data"),
            error=_field(d, "error", str, None),
            code=_field(d, "code", str, None),
        )


@dataclass(slots=True)
class ProgressBody:
    """The ``data`` of a ``progress`` frame."""

    request_id: str
    progress: float | None = None
    message: str | None = None

    @classmethod
    def from_message(cls, msg: Message) -> ProgressBody:
        d = msg.data
        progress = _field(d, "progress", (int, float), None)
        if progress is not None and not 0 <= progress <= 1:
            raise ProtocolError("Field 'progress' must be from 0 to 1")
        return cls(_text(d, "request_id", MAX_ID_CHARS), None if progress is None
                   else float(progress),
                   _text(d, "message", MAX_PROGRESS_MESSAGE, None))


#: Chunks a job may have sent and not yet seen acknowledged: beyond, it waits. What a
#: slow requester does not read cannot pile up anywhere but in this window (a worker
#: that sends twice as many has its request failed).
CHUNK_WINDOW = 8


@dataclass(slots=True)
class ChunkBody:
    """The ``data`` of a ``chunk`` or ``chunk_ack`` frame (the latter without data)."""

    request_id: str
    seq: int
    data: Any = None

    @classmethod
    def from_message(cls, msg: Message) -> ChunkBody:
        seq = _field(msg.data, "seq", int)
        if seq < 0:
            raise ProtocolError("Field 'seq' must be 0 or more")
        return cls(_text(msg.data, "request_id", MAX_ID_CHARS), seq, msg.data.get("data"))
