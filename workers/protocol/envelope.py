"""The envelope spoken on the worker socket (and by the seed's console):
``{"type", "msg_id", "timestamp", "data"}``, with one constructor for each frame the
two sides exchange, so that each frame's shape is written down once.

What the ``data`` of a frame holds is read by :mod:`workers.protocol.bodies`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator

from .codec import dumps, loads_object
from .codes import ErrorCode
from .errors import ProtocolError
from .fields import MAX_ID_CHARS, MAX_NAME_CHARS, _field, _seconds_or_weight, _text
from .ids import new_id


class MessageType(str, Enum):
    """Envelope types of the seed. Others may be added by registering a handler."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    HEARTBEAT = "heartbeat"
    ERROR = "error"
    REQUEST = "request"
    RESPONSE = "response"
    NOTIFICATION = "notification"
    CUSTOM = "custom"
    # Long jobs (opt-in: a worker written from the seed never sees or sends them).
    CANCEL = "cancel"  # broker -> worker: stop this request
    PROGRESS = "progress"  # worker -> broker: how far a request got (also: it lives)
    CHUNK = "chunk"  # worker -> broker: one partial result of a request
    CHUNK_ACK = "chunk_ack"  # broker -> worker: a chunk was passed on; send more
    # Resume (opt-in): a job of before a restart, adopted after the registration answer.
    ADOPT = "adopt"  # broker -> worker: {"jobs": [ids]}: go on with these, send their frames


@dataclass(slots=True)
class Message:
    """One envelope frame: ``{"type", "msg_id", "timestamp", "data"}``."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    msg_id: str = field(default_factory=new_id)
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return dumps(self.envelope())

    def envelope(self) -> dict[str, Any]:
        """The frame as the JSON object it is written as."""
        return {"type": self.type, "msg_id": self.msg_id, "timestamp": self.timestamp,
                "data": self.data}

    @classmethod
    def from_json(cls, text: str | bytes) -> Message:
        """Parse one frame; raises :class:`ProtocolError` with a readable reason."""
        return cls.from_dict(loads_object(text))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Message:
        kind = _text(obj, "type", MAX_NAME_CHARS)
        if not kind:
            raise ProtocolError("Field 'type' must not be empty")
        return cls(
            type=kind,
            data=_field(obj, "data", dict, {}),
            msg_id=_text(obj, "msg_id", MAX_ID_CHARS, None) or new_id(),
            timestamp=_seconds_or_weight(obj, "timestamp", time.time()),
        )

    # Constructors for the frames the two sides exchange. They keep the shape of
    # each frame in one place; the README's protocol section mirrors them.

    @classmethod
    def request(cls, action: str, params: dict[str, Any] | None = None,
                msg_id: str | None = None, *, time_left: float | None = None,
                stream: bool = False, traceparent: str | None = None) -> Message:
        """Ask the other side to run ``action``; answered by a ``response``."""
        data: dict[str, Any] = {"action": action, "params": params or {}}
        if time_left is not None:
            data["time_left"] = round(time_left, 3)
        if stream:
            data["stream"] = True
        if traceparent:
            data["traceparent"] = traceparent
        return cls(MessageType.REQUEST.value, data, msg_id=msg_id or new_id())

    @classmethod
    def response(cls, request_id: str, success: bool, data: Any = None,
                 error: str | None = None, code: ErrorCode | None = None) -> Message:
        """Answer to the ``request`` whose ``msg_id`` was ``request_id``."""
        body = {"request_id": request_id, "success": success, "data": data, "error": error}
        if code is not None:
            body["code"] = code.value
        return cls(MessageType.RESPONSE.value, body)

    @classmethod
    def error(cls, text: str, reply_to: str | None = None,
              code: ErrorCode | None = None) -> Message:
        """Tell the peer that one of its frames was refused, and why."""
        body = {"error": text, "reply_to": reply_to}
        if code is not None:
            body["code"] = code.value
        return cls(MessageType.ERROR.value, body)

    @classmethod
    def heartbeat(cls, ack: str | None = None, want_ack: bool = False, **stats: Any
                  ) -> Message:
        """A ping (``ack`` unset) or the answer to the ping whose msg_id is ``ack``;
        ``want_ack``: a quiet-heartbeat worker asks for an answer this time."""
        data: dict[str, Any] = dict(stats)
        if ack is not None:
            data["ack"] = ack
        if want_ack:
            data["want_ack"] = True
        return cls(MessageType.HEARTBEAT.value, data)

    @classmethod
    def notification(cls, message: Any, **extra: Any) -> Message:
        """One-way news, such as a broadcast; never answered."""
        return cls(MessageType.NOTIFICATION.value, {"message": message, **extra})

    @classmethod
    def cancel(cls, request_id: str, reason: str) -> Message:
        """(broker -> worker) Stop the request ``request_id``; answer it when stopped."""
        return cls(MessageType.CANCEL.value, {"request_id": request_id, "reason": reason})

    @classmethod
    def progress(cls, request_id: str, progress: float | None = None,
                 message: str | None = None) -> Message:
        """(worker -> broker) How far ``request_id`` got; with neither field, only that
        it still lives (a job heartbeat, for leases)."""
        data: dict[str, Any] = {"request_id": request_id}
        if progress is not None:
            data["progress"] = progress
        if message is not None:
            data["message"] = message
        return cls(MessageType.PROGRESS.value, data)

    @classmethod
    def chunk(cls, request_id: str, seq: int, data: Any) -> Message:
        """(worker -> broker) Partial result number ``seq`` (from 0) of ``request_id``."""
        return cls(MessageType.CHUNK.value, {"request_id": request_id, "seq": seq, "data": data})

    @classmethod
    def chunk_ack(cls, request_id: str, seq: int) -> Message:
        """(broker -> worker) Chunk ``seq`` of ``request_id`` was passed on."""
        return cls(MessageType.CHUNK_ACK.value, {"request_id": request_id, "seq": seq})


def batch_messages(frames: list[Any]) -> Iterator[Message | ProtocolError]:
    """Each envelope of a batch (:func:`~workers.protocol.codec.loads_frames`) on its
    own: a bad one becomes its error, and the others still count."""
    for obj in frames:
        if not isinstance(obj, dict):
            yield ProtocolError("Each frame of a batch must be a JSON object")
            continue
        try:
            yield Message.from_dict(obj)
        except ProtocolError as exc:
            yield exc
