"""Wire formats of both sockets, as plain data.

Nothing here does I/O: a frame goes in as text and comes out as an object, or the
other way round. The broker imports this module too, so the worker side and the
broker can never disagree about what a frame means.

Two formats live here:

* the **envelope** spoken on the worker socket (and by the seed's console):
  ``{"type", "msg_id", "timestamp", "data"}``;
* the **requester API** spoken on the requester socket:
  ``{"request_id", "command", "data"}`` answered by
  ``{"request_id", "success", "data", "error", "processed_by"}``.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: What the stdlib parser raises on bad input: ValueError also covers integers over
#: 4,300 digits, RecursionError deep nesting.
STDLIB_DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError)

try:  # orjson is several times faster; the worker side must not require it.
    import orjson

    def dumps(obj: Any) -> str:
        """Serialize to compact JSON text.

        What orjson refuses but JSON can carry (integers beyond 64 bits, as
        ``calculate`` can produce, or non-string keys) goes through the stdlib
        encoder, so an answer does not depend on whether orjson is installed.
        """
        try:
            return orjson.dumps(obj).decode()
        except orjson.JSONEncodeError:
            return _encoder.encode(obj)

    def _loads(text: str | bytes) -> Any:
        return orjson.loads(text)

    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - exercised on worker machines
    def dumps(obj: Any) -> str:
        """Serialize to compact JSON text."""
        return _encoder.encode(obj)

    def _loads(text: str | bytes) -> Any:
        return json.loads(text)

    _DecodeError = STDLIB_DECODE_ERRORS


# Error texts a requester sees; the first two are the seed's own wording.
NO_WORKERS = "No available workers"
TIMEOUT = "Worker response timeout"
WORKER_LOST = "Worker lost"
ALL_BUSY = "All workers busy"
BROKER_OVERLOADED = "Broker overloaded"
SHUTTING_DOWN = "Broker shutting down"
BROKER_UNAVAILABLE = "Broker unavailable"


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


class ProtocolError(ValueError):
    """A frame that breaks the protocol.

    ``str(error)`` is meant for the peer: it says what is wrong in words a
    developer can act on. ``request_id`` is kept when it could be read, so the
    error answer can still be matched to its request.
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


def _renew_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX, _id_counter = secrets.token_hex(8), itertools.count(1)


os.register_at_fork(after_in_child=_renew_id_prefix)


def new_id() -> str:
    """A unique id for messages and requests: 64 random bits per process, then a counter.

    The broker makes one or two per request; ``uuid4`` costs a system call each
    (``os.urandom``), which showed up at ~9% of the broker's profile. Not secret.
    """
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def random_id(nbytes: int = 6) -> str:
    """A random id (worker ids, sessions): unique without any counter to share."""
    return secrets.token_hex(nbytes)


def loads_object(text: str | bytes) -> dict[str, Any]:
    """Parse JSON text that must hold an object."""
    try:
        obj = _loads(text)
    except _DecodeError as exc:
        raise ProtocolError(f"Malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"Expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...,
           request_id: str | None = None) -> Any:
    """Read one field, checking its type; ``...`` as default makes it required."""
    if name not in obj or obj[name] is None:
        if default is ...:
            raise ProtocolError(f"Missing field '{name}'", request_id=request_id)
        return default
    value = obj[name]
    # bool is an int subclass: never accept it where a number is wanted.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise ProtocolError(
            f"Field '{name}' must be {want}, got {type(value).__name__}", request_id=request_id
        )
    return value


def _seconds_or_weight(obj: dict[str, Any], name: str, default: float) -> float:
    """A number field as float; an integer too large for a float is refused, not raised."""
    try:
        return float(_field(obj, name, (int, float), default))
    except OverflowError:
        raise ProtocolError(f"Field '{name}' is out of range") from None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# --------------------------------------------------------------------------- envelope


@dataclass(slots=True)
class Message:
    """One envelope frame: ``{"type", "msg_id", "timestamp", "data"}``."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    msg_id: str = field(default_factory=new_id)
    timestamp: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return dumps({"type": self.type, "msg_id": self.msg_id,
                      "timestamp": self.timestamp, "data": self.data})

    @classmethod
    def from_json(cls, text: str | bytes) -> Message:
        """Parse one frame; raises :class:`ProtocolError` with a readable reason."""
        return cls.from_dict(loads_object(text))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Message:
        kind = _field(obj, "type", str)
        if not kind:
            raise ProtocolError("Field 'type' must not be empty")
        return cls(
            type=kind,
            data=_field(obj, "data", dict, {}),
            msg_id=_field(obj, "msg_id", str, None) or new_id(),
            timestamp=_seconds_or_weight(obj, "timestamp", time.time()),
        )

    # Constructors for the frames the two sides exchange. They keep the shape of
    # each frame in one place; the README's protocol section mirrors them.

    @classmethod
    def request(cls, action: str, params: dict[str, Any] | None = None,
                msg_id: str | None = None) -> Message:
        """Ask the other side to run ``action``; answered by a ``response``."""
        return cls(MessageType.REQUEST.value, {"action": action, "params": params or {}},
                   msg_id=msg_id or new_id())

    @classmethod
    def response(cls, request_id: str, success: bool, data: Any = None,
                 error: str | None = None) -> Message:
        """Answer to the ``request`` whose ``msg_id`` was ``request_id``."""
        return cls(MessageType.RESPONSE.value,
                   {"request_id": request_id, "success": success, "data": data, "error": error})

    @classmethod
    def error(cls, text: str, reply_to: str | None = None) -> Message:
        """Tell the peer that one of its frames was refused, and why."""
        return cls(MessageType.ERROR.value, {"error": text, "reply_to": reply_to})

    @classmethod
    def heartbeat(cls, ack: str | None = None, **stats: Any) -> Message:
        """A ping (``ack`` unset) or the answer to the ping whose msg_id is ``ack``."""
        data: dict[str, Any] = dict(stats)
        if ack is not None:
            data["ack"] = ack
        return cls(MessageType.HEARTBEAT.value, data)

    @classmethod
    def notification(cls, message: Any, **extra: Any) -> Message:
        """One-way news, such as a broadcast; never answered."""
        return cls(MessageType.NOTIFICATION.value, {"message": message, **extra})


@dataclass(slots=True)
class RequestBody:
    """The ``data`` of a ``request`` envelope: ``{"action", "params"}``."""

    action: str
    params: dict[str, Any]

    @classmethod
    def from_message(cls, msg: Message) -> RequestBody:
        action = _field(msg.data, "action", str, request_id=msg.msg_id)
        if not action:
            raise ProtocolError("Field 'action' must not be empty", request_id=msg.msg_id)
        return cls(action, _field(msg.data, "params", dict, {}, request_id=msg.msg_id))


@dataclass(slots=True)
class ResponseBody:
    """The ``data`` of a ``response`` envelope."""

    request_id: str
    success: bool
    data: Any = None
    error: str | None = None

    @classmethod
    def from_message(cls, msg: Message) -> ResponseBody:
        d = msg.data
        return cls(
            request_id=_field(d, "request_id", str),
            success=_field(d, "success", bool),
            data=d.get("data"),
            error=_field(d, "error", str, None),
        )


@dataclass(slots=True)
class Registration:
    """What a worker says about itself in its ``connect`` frame."""

    worker_id: str
    name: str
    commands: list[str]
    weight: float = 1.0
    max_concurrency: int = 16
    #: Commands never to be re-sent to another worker if this one is lost mid-request.
    no_retry: list[str] = field(default_factory=list)

    def to_data(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "name": self.name, "commands": self.commands,
                "weight": self.weight, "max_concurrency": self.max_concurrency,
                "no_retry": self.no_retry}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Registration:
        commands = _field(data, "commands", list)
        if not all(isinstance(c, str) and c for c in commands):
            raise ProtocolError("Field 'commands' must be a list of non-empty strings")
        weight = _seconds_or_weight(data, "weight", 1.0)
        if not weight > 0:
            raise ProtocolError("Field 'weight' must be greater than 0")
        max_concurrency = _field(data, "max_concurrency", int, 16)
        if max_concurrency < 1:
            raise ProtocolError("Field 'max_concurrency' must be at least 1")
        no_retry = _field(data, "no_retry", list, [])
        if not all(isinstance(c, str) for c in no_retry):
            raise ProtocolError("Field 'no_retry' must be a list of strings")
        worker_id = _field(data, "worker_id", str, None) or random_id()
        return cls(worker_id=worker_id, name=_field(data, "name", str, None) or worker_id,
                   commands=commands, weight=weight, max_concurrency=max_concurrency,
                   no_retry=no_retry)


# --------------------------------------------------------------------------- requester API


@dataclass(slots=True)
class ApiRequest:
    """``{"request_id", "command", "data"}``, plus an optional ``timeout`` in seconds."""

    command: str
    data: dict[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timeout: float | None = None

    def to_json(self) -> str:
        obj: dict[str, Any] = {"request_id": self.request_id, "command": self.command,
                               "data": self.data}
        if self.timeout is not None:
            obj["timeout"] = self.timeout
        return dumps(obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiRequest:
        """Parse a request; a request without ``request_id`` is given one."""
        obj = loads_object(text)
        rid = obj.get("request_id")
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError("Field 'request_id' must be str")
        rid = rid or str(uuid.uuid4())
        command = _field(obj, "command", str, request_id=rid)
        if not command:
            raise ProtocolError("Field 'command' must not be empty", request_id=rid)
        timeout = _field(obj, "timeout", (int, float), None, request_id=rid)
        if timeout is not None and not 0 < timeout <= 86400:
            raise ProtocolError("Field 'timeout' must be between 0 and 86400 seconds",
                                request_id=rid)
        return cls(command=command, data=_field(obj, "data", dict, {}, request_id=rid),
                   request_id=rid, timeout=None if timeout is None else float(timeout))


@dataclass(slots=True)
class ApiResponse:
    """``{"request_id", "success", "data", "error", "processed_by"}``."""

    request_id: str | None
    success: bool
    data: Any = None
    error: str | None = None
    processed_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "success": self.success, "data": self.data,
                "error": self.error, "processed_by": self.processed_by}

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def failure(cls, request_id: str | None, error: str) -> ApiResponse:
        return cls(request_id, False, None, error, None)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiResponse:
        obj = loads_object(text)
        return cls(
            request_id=_field(obj, "request_id", str, None),
            success=_field(obj, "success", bool),
            data=obj.get("data"),
            error=_field(obj, "error", str, None),
            processed_by=_field(obj, "processed_by", str, None),
        )
