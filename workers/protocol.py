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
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Iterator

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

    #: An integer outside [-2**63, 2**64 - 1] (20 digits, or 19 after a minus) would come
    #: out of orjson as a float (2**64 + 1 -> 1.8446744073709552e+19); the stdlib parser
    #: keeps it exact. A run of 19 digits is looked for by mapping every digit to "0"
    #: and everything else to " " (bytes.translate: ~0.5 us a frame; a regex took 7).
    #: Digits in strings count too: that costs only speed.
    _DIGITS = bytes(48 if 48 <= i <= 57 else 32 for i in range(256))
    _RUN = b"0" * 19

    def _long_digits(text: str | bytes) -> bool:
        raw = text.encode() if isinstance(text, str) else text
        return _RUN in raw.translate(_DIGITS)

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")  # as orjson refuses NaN and Infinity

    def _loads(text: str | bytes) -> Any:
        """orjson, unless the text may hold an integer it cannot keep exact."""
        if _long_digits(text):
            return json.loads(text, parse_constant=_no_constants)
        return orjson.loads(text)

    _DecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,
                                                 *STDLIB_DECODE_ERRORS)
except ImportError:  # pragma: no cover - exercised on worker machines
    def dumps(obj: Any) -> str:
        """Serialize to compact JSON text."""
        return _encoder.encode(obj)

    def _loads(text: str | bytes) -> Any:
        return json.loads(text)

    _DecodeError = STDLIB_DECODE_ERRORS


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


#: Priorities a request may carry; higher is served first, 0 when it names none.
PRIORITIES = range(0, 10)
#: The longest timeout the protocol takes; the broker's MAX_TIMEOUT may be shorter.
MAX_PROTOCOL_TIMEOUT = 30 * 86400

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


#: Longest command/action name, request id and worker id or name a peer may send:
#: they end up in logs, history rows and error texts, so they are kept short.
MAX_NAME_CHARS = 200
MAX_ID_CHARS = 128
#: Most commands one worker may register.
MAX_COMMANDS = 1000
#: What a worker id may be made of: printable ASCII without spaces, so that no id can
#: pass for another in a log line or an admin page (a trailing zero-width space,
#: a full-width digit).
WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]+")


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


#: C0 and C1 control characters, DEL and the Unicode line separators: what could
#: forge a log line or hide text in a terminal.
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNSAFE.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028",
                0x2029: "\\u2029"})


def quote(value: Any, limit: int = 100) -> str:
    """A peer-supplied value made safe to put in a log line or an error text.

    Control characters are escaped (no forged lines) and the text is cut to about
    ``limit`` characters, saying how much was left out (no log floods).
    """
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = text.translate(_UNSAFE)
    return f"{text}...(+{cut} chars)" if cut > 0 else text


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


class Feature(str, Enum):
    """What a worker may ask for at registration (``"features": [...]``); the broker's
    answer lists those it grants. A worker written from the seed asks for none and
    is served as before; a name this side does not know is ignored, not refused."""

    #: Heartbeats are acked only when they carry ``"want_ack": true``, and the broker
    #: pings only when the worker falls silent: one frame per idle interval, not four.
    QUIET_HEARTBEAT = "quiet_heartbeat"
    #: Several frames in one: a JSON array of envelopes, either way (requests to the
    #: worker, answers back). Under load the broker then writes fewer frames.
    BATCH = "batch"

    @staticmethod
    def listed(features: frozenset[Feature]) -> list[str]:
        """The wire form of a set of features: their names, sorted."""
        return sorted(f.value for f in features)

    @classmethod
    def parse(cls, value: Any) -> frozenset[Feature]:
        if value is None:
            return frozenset()
        if not isinstance(value, list):
            raise ProtocolError("Field 'features' must be a list of names")
        known = {f.value: f for f in cls}
        return frozenset(known[v] for v in value[:32] if isinstance(v, str) and v in known)


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


#: Envelopes in one batch frame (:attr:`Feature.BATCH`), and the size a sender keeps a
#: batch frame under (a larger envelope still goes alone, in its own frame).
MAX_BATCH = 256
BATCH_BYTES = 64 * 1024


def loads_frames(text: str | bytes) -> list[dict[str, Any]]:
    """One frame's envelopes: an object, or a batch (a JSON array of objects)."""
    try:
        obj = _loads(text)
    except _DecodeError as exc:
        raise ProtocolError(f"Malformed JSON: {exc}") from None
    if isinstance(obj, dict):
        return [obj]
    if not isinstance(obj, list) or not obj:
        raise ProtocolError(f"Expected a JSON object or a non-empty array of them, got "
                            f"{type(obj).__name__ if obj != [] else 'an empty array'}")
    if len(obj) > MAX_BATCH:
        raise ProtocolError(f"Batch of {len(obj)} frames (at most {MAX_BATCH})")
    return obj


def batch_messages(frames: list[Any]) -> Iterator[Message | ProtocolError]:
    """Each envelope of a batch (:func:`loads_frames`) on its own: a bad one becomes
    its error, and the others still count."""
    for obj in frames:
        if not isinstance(obj, dict):
            yield ProtocolError("Each frame of a batch must be a JSON object")
            continue
        try:
            yield Message.from_dict(obj)
        except ProtocolError as exc:
            yield exc


def batch_frames(texts: list[str], limit: int = BATCH_BYTES) -> Iterator[str]:
    """Encoded envelopes joined into as few frames as ``limit`` allows, in order."""

    def joined(run: list[str]) -> str:
        return run[0] if len(run) == 1 else "[" + ",".join(run) + "]"

    run: list[str] = []
    size = 0
    for text in texts:
        if run and (size + len(text) + 1 > limit or len(run) == MAX_BATCH):
            yield joined(run)
            run, size = [], 0
        run.append(text)
        size += len(text) + 1
    if run:
        yield joined(run)


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


def _text(obj: dict[str, Any], name: str, limit: int, default: Any = ...,
          request_id: str | None = None) -> Any:
    """A string field of at most ``limit`` characters (names and ids)."""
    value = _field(obj, name, str, default, request_id)
    if isinstance(value, str) and len(value) > limit:
        raise ProtocolError(f"Field '{name}' is too long ({len(value)} characters, limit "
                            f"{limit})", request_id=request_id)
    return value


def _names(obj: dict[str, Any], name: str, default: Any = ...) -> list[str]:
    """A list of command names: non-empty strings of at most MAX_NAME_CHARS, MAX_COMMANDS."""
    value = _field(obj, name, list, default)
    if not all(isinstance(c, str) and c for c in value):
        raise ProtocolError(f"Field '{name}' must be a list of non-empty strings")
    if len(value) > MAX_COMMANDS:
        raise ProtocolError(f"Field '{name}' lists {len(value)} commands (limit "
                            f"{MAX_COMMANDS})")
    long = next((c for c in value if len(c) > MAX_NAME_CHARS), None)
    if long is not None:
        raise ProtocolError(f"Field '{name}' has a name of {len(long)} characters (limit "
                            f"{MAX_NAME_CHARS}): '{quote(long, 40)}'")
    odd = next((c for c in value if not c.isprintable()), None)
    if odd is not None:
        raise ProtocolError(f"Field '{name}' has a name that is not printable text: "
                            f"'{quote(odd, 40)}'")
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


#: Labels a worker may carry, and the characters of a label's name or value.
MAX_LABELS = 32
MAX_LABEL_CHARS = 64


def label(text: str) -> tuple[str, str]:
    """One label from the command line, ``NAME=VALUE`` (an argparse type)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(text)
    return name, value


def parse_labels(value: Any, name: str) -> dict[str, str]:
    """A label map (``{"gpu": "a100"}``): short strings to short strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and k and len(k) <= MAX_LABEL_CHARS
            and len(v) <= MAX_LABEL_CHARS and k.isprintable() and v.isprintable()
            for k, v in value.items()):
        raise ProtocolError(f"Field '{name}' must map up to {MAX_LABELS} names to values "
                            f"(printable strings of at most {MAX_LABEL_CHARS} characters)")
    return dict(value)


# --------------------------------------------------------------------------- schemas

#: A worker's command schemas at most, as compact JSON, in bytes: the broker keeps
#: them for every worker, so they must stay small beside the rest of its entry.
MAX_SCHEMAS_BYTES = 16384
#: Parameters one schema may list, and characters of any text in it (a name, a type,
#: the docstring's first line, a default's JSON or repr).
MAX_PARAMS = 64
MAX_SCHEMA_CHARS = 200
#: Reasons for dropped schemas kept (and told to the worker) at most.
MAX_SCHEMA_REASONS = 10


class SchemaError(ProtocolError):
    """A command schema that is not kept: the worker registers without it."""


def parse_schemas(value: dict[str, Any], commands: list[str]
                  ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The schemas of a registration worth keeping, and why the others were dropped.

    A schema only describes a command, so a bad one costs that command its
    description, never the worker its registration (nor can a newer worker's richer
    schemas lock it out of an older broker). The whole field is dropped when its
    compact JSON is over MAX_SCHEMAS_BYTES; one command's schema when it is not
    :func:`parse_schema`'s or names a command the worker does not offer.
    """
    if not value:
        return {}, []
    try:
        size = len(dumps(value).encode())
    except RecursionError:
        return {}, ["Field 'schemas' is nested too deeply"]
    if size > MAX_SCHEMAS_BYTES:
        return {}, [f"Field 'schemas' is {size} bytes as compact JSON (limit "
                    f"{MAX_SCHEMAS_BYTES})"]
    offered = set(commands)
    kept: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for command, schema in value.items():
        try:
            if command not in offered:
                raise SchemaError("not a command of this worker")
            kept[command] = parse_schema(schema)
        except SchemaError as exc:
            dropped.append(f"schema of '{quote(command, 40)}': {exc}")
    if len(dropped) > MAX_SCHEMA_REASONS:
        dropped[MAX_SCHEMA_REASONS - 1:] = [
            f"and {len(dropped) - MAX_SCHEMA_REASONS + 1} more"]
    return kept, dropped


def parse_schema(value: Any) -> dict[str, Any]:
    """One command's schema, checked, with only the keys this version knows.

    ``{"params": [{"name", "type"?, "required", "default"? | "default_repr"?}, ...],
    "returns"?, "doc"?, "extra"?, "stream"?}``: ``extra`` when the handler takes
    parameters beyond those listed (``**kwargs``), ``stream`` when it streams chunks.
    Texts are printable and short; a ``default`` is JSON of at most MAX_SCHEMA_CHARS.
    Raises :class:`SchemaError`.
    """
    if not isinstance(value, dict):
        raise SchemaError(f"must be an object, got {type(value).__name__}")
    params = value.get("params")
    if not isinstance(params, list):
        raise SchemaError("'params' must be a list")
    if len(params) > MAX_PARAMS:
        raise SchemaError(f"lists {len(params)} parameters (limit {MAX_PARAMS})")
    out: dict[str, Any] = {"params": [_param(p, i) for i, p in enumerate(params, 1)]}
    names = [p["name"] for p in out["params"]]
    if len(set(names)) < len(names):
        raise SchemaError("lists a parameter twice")
    for key in ("returns", "doc"):
        text = _schema_text(value, key)
        if text:
            out[key] = text
    for key in ("extra", "stream"):
        flag = value.get(key, False)
        if not isinstance(flag, bool):
            raise SchemaError(f"'{key}' must be true or false")
        if flag:
            out[key] = True
    return out


def _param(value: Any, number: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"parameter {number} must be an object")
    name = _schema_text(value, "name", f"parameter {number}")
    if not name:
        raise SchemaError(f"parameter {number} must have a 'name'")
    out: dict[str, Any] = {"name": name}
    kind = _schema_text(value, "type", f"parameter '{name}'")
    if kind:
        out["type"] = kind
    required = value.get("required")
    if not isinstance(required, bool):
        raise SchemaError(f"parameter '{name}': 'required' must be true or false")
    out["required"] = required
    if "default" in value and "default_repr" in value:
        raise SchemaError(f"parameter '{name}' has both 'default' and 'default_repr'")
    if required and ("default" in value or "default_repr" in value):
        raise SchemaError(f"parameter '{name}' is required, yet has a default")
    if "default" in value:
        out["default"] = _default(value["default"], name)
    elif "default_repr" in value:
        out["default_repr"] = _schema_text(value, "default_repr", f"parameter '{name}'")
    return out


def _schema_text(obj: dict[str, Any], key: str, where: str = "") -> str:
    """A text of a schema: printable, at most MAX_SCHEMA_CHARS; "" when absent."""
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_SCHEMA_CHARS \
            or not value.isprintable():
        raise SchemaError(f"{where + ': ' if where else ''}'{key}' must be printable text of "
                          f"at most {MAX_SCHEMA_CHARS} characters")
    return value


def _default(value: Any, name: str) -> Any:
    """A default value: JSON that reads back as itself (an overflowed 1e400 would not)."""
    try:
        text = dumps(value)
    except RecursionError:
        raise SchemaError(f"parameter '{name}': 'default' is nested too deeply") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"parameter '{name}': 'default' is {len(text)} characters of JSON "
                          f"(limit {MAX_SCHEMA_CHARS})")
    if _loads(text) != value:
        raise SchemaError(f"parameter '{name}': 'default' is not plain JSON")
    return value


#: Characters of a progress message passed on.
MAX_PROGRESS_MESSAGE = 1000


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
    #: Commands that must show life (progress, a job heartbeat) every so many seconds.
    leases: dict[str, float] = field(default_factory=dict)
    #: What requests may select this worker by (``{"gpu": "a100", "region": "eu"}``).
    labels: dict[str, str] = field(default_factory=dict)
    #: The worker's version, for canary routing.
    version: str = ""
    #: Commands that may be hedged (sent to a second worker when the first is slow).
    hedge: list[str] = field(default_factory=list)
    #: What each command takes and does, for ``describe`` (see :func:`parse_schema`).
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What it asks of the broker beyond the seed's protocol (:class:`Feature`).
    features: frozenset[Feature] = frozenset()
    #: Parsed only: why schemas the worker sent were not kept (its answer says so).
    schemas_dropped: list[str] = field(default_factory=list, compare=False)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"worker_id": self.worker_id, "name": self.name,
                                "commands": self.commands, "weight": self.weight,
                                "max_concurrency": self.max_concurrency,
                                "no_retry": self.no_retry}
        for name in ("leases", "labels", "version", "hedge", "schemas"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        if self.features:
            data["features"] = Feature.listed(self.features)
        return data

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Registration:
        commands = _names(data, "commands")
        weight = _seconds_or_weight(data, "weight", 1.0)
        if not weight > 0:
            raise ProtocolError("Field 'weight' must be greater than 0")
        max_concurrency = _field(data, "max_concurrency", int, 16)
        if max_concurrency < 1:
            raise ProtocolError("Field 'max_concurrency' must be at least 1")
        no_retry = _names(data, "no_retry", [])
        leases = _field(data, "leases", dict, {})
        if len(leases) > MAX_COMMANDS or not all(
                isinstance(k, str) and k in commands and isinstance(v, (int, float))
                and not isinstance(v, bool) and 0 < v <= MAX_PROTOCOL_TIMEOUT
                for k, v in leases.items()):
            raise ProtocolError("Field 'leases' must map commands of this worker to seconds")
        labels = parse_labels(data.get("labels"), "labels")
        schemas, dropped = parse_schemas(_field(data, "schemas", dict, {}), commands)
        hedge = _names(data, "hedge", [])
        version = _text(data, "version", MAX_LABEL_CHARS, "") or ""
        if not version.isprintable():
            raise ProtocolError("Field 'version' must be printable text")
        worker_id = _text(data, "worker_id", MAX_ID_CHARS, None) or random_id()
        if not WORKER_ID.fullmatch(worker_id):
            raise ProtocolError("Field 'worker_id' may hold only letters, digits and . _ : @ -"
                                f", got '{quote(worker_id, 40)}'")
        name = _text(data, "name", MAX_NAME_CHARS, None) or worker_id
        if not name.isprintable():
            raise ProtocolError(f"Field 'name' must be printable text, got '{quote(name, 40)}'")
        return cls(worker_id=worker_id, name=name,
                   commands=commands, weight=weight, max_concurrency=max_concurrency,
                   no_retry=no_retry, leases={k: float(v) for k, v in leases.items()},
                   labels=labels, version=version, hedge=hedge, schemas=schemas,
                   features=Feature.parse(data.get("features")), schemas_dropped=dropped)


# --------------------------------------------------------------------------- requester API


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def parse_traceparent(value: Any) -> str | None:
    """A W3C ``traceparent`` (version-trace id-parent id-flags), or None for anything
    else: version ff, all-zero ids, or text that is not one. A later version's extra
    fields are cut off (what version 00 defines is kept)."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    head = value[:55]
    match = _TRACEPARENT.fullmatch(head)
    if match is None or (len(value) > 55 and (match[1] == "00" or value[55] != "-")):
        return None
    version, trace_id, parent_id = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return head


@dataclass(slots=True)
class ApiRequest:
    """``{"request_id", "command", "data"}``, plus optional ``timeout`` (seconds),
    ``stream`` (send progress and chunk events before the answer), ``priority`` (0-9,
    higher first), ``select`` (labels its worker must have), ``affinity`` (a key:
    requests with one key go to one worker), ``hedge`` and ``traceparent`` (a W3C
    trace context, passed on to the worker and given back in the answer; one that is
    not well formed is ignored, as the W3C recommendation says, never refused)."""

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

    def to_json(self) -> str:
        obj: dict[str, Any] = {"request_id": self.request_id, "command": self.command,
                               "data": self.data}
        if self.timeout is not None:
            obj["timeout"] = self.timeout
        for name in ("stream", "priority", "select", "affinity", "hedge", "traceparent"):
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
                   traceparent=parse_traceparent(obj.get("traceparent")))


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
    obj = loads_object(text)
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
        obj = loads_object(text)
        return cls(
            request_id=_field(obj, "request_id", str, None),
            success=_field(obj, "success", bool),
            data=obj.get("data"),
            error=_field(obj, "error", str, None),
            processed_by=_field(obj, "processed_by", str, None),
            code=_field(obj, "code", str, None),
            route={k: obj[k] for k in ROUTE_FIELDS if k in obj} or None,
        )
