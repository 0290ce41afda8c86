"""What broker processes tell each other: one frozen dataclass per kind of event.

Every event goes to a process's inbox and is handled there by whoever registered
for its type with the :class:`~dispatch.core.exchange.Exchange`: the dispatcher
(answers, progress, asks), or the process's worker connections (forwards, cancels,
broadcasts). Within one process the event object itself is handed over; it becomes
a plain dict only at the channel layer's edge (:func:`to_layer`,
:func:`from_layer`), where several for one inbox travel as one batch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterator

#: Group every process's inbox joins, so one group_send reaches every broker process.
INBOXES_GROUP = "dispatch.inboxes"
#: The layer message that carries several events for one inbox.
BATCH = "broker.batch"


class Departure(enum.StrEnum):
    """How a worker's connection ended, for the requests it held (with resume, the
    worker keeps running them)."""

    CLOSED = ""  # closed by the broker for cause (silent, hung, replaced): they are lost
    DROPPED = "dropped"  # it dropped: a network blip, or a dead worker
    SENT_AWAY = "sent_away"  # its broker process is leaving: it comes back elsewhere


class AskKind(enum.StrEnum):
    """What a process asks the others about a request it does not hold."""

    CANCEL = "cancel"  # cancel it wherever it runs
    ATTACH = "attach"  # send me its events and answer
    STATUS = "status"  # is it running anywhere?


@dataclass(frozen=True, slots=True)
class Forward:
    """The request's process -> the worker's: run this request on that connection."""

    TYPE: ClassVar[str] = "broker.forward"
    key: str  # the request's name inside the broker
    command: str
    data: dict[str, Any]
    reply_to: str  # the inbox of the process that holds the request
    timeout: float  # seconds it has left
    worker_id: str
    connection: str  # the worker's connection, in the receiving process
    stream: bool = False
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """The worker's process -> the request's: the worker's answer."""

    TYPE: ClassVar[str] = "broker.reply"
    key: str
    worker_id: str
    success: bool
    data: Any
    error: str | None
    latency_ms: float
    code: str | None = None  # the ErrorCode of a failure (the worker's, or ours about it)


@dataclass(frozen=True, slots=True)
class Lost:
    """The worker's process -> the request's: the worker went away mid-request (or
    hung past its lease)."""

    TYPE: ClassVar[str] = "broker.lost"
    key: str
    worker_id: str
    reason: str
    code: str | None = None  # to answer with if it is not re-sent (default worker_lost)
    #: With resume, how its connection ended: whether the worker may come back with it.
    departure: Departure = Departure.CLOSED


@dataclass(frozen=True, slots=True)
class Progress:
    """The worker's process -> the request's: how far it got."""

    TYPE: ClassVar[str] = "broker.progress"
    key: str
    worker_id: str
    progress: float | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Chunk:
    """The worker's process -> the request's: one partial result, acknowledged to
    ``ack_to`` (the worker's process) once a watcher took it."""

    TYPE: ClassVar[str] = "broker.chunk"
    key: str
    worker_id: str
    seq: int
    data: Any
    ack_to: str
    connection: str


@dataclass(frozen=True, slots=True)
class ChunkAck:
    """The request's process -> the worker's: that chunk was passed on."""

    TYPE: ClassVar[str] = "broker.chunk_ack"
    key: str
    connection: str
    seq: int


@dataclass(frozen=True, slots=True)
class Cancel:
    """The request's process -> the worker's: stop that request."""

    TYPE: ClassVar[str] = "broker.cancel"
    key: str
    connection: str
    reason: str


@dataclass(frozen=True, slots=True)
class Ask:
    """Anyone -> every process (the group): about a request by its id. ``owner`` None:
    whoever's (an operator's cancel)."""

    TYPE: ClassVar[str] = "broker.ask"
    kind: AskKind
    owner: str | None
    request_id: str
    reply_to: str
    token: str
    reason: str = ""  # a cancel's
    key: str = ""  # an attach's: the asker's name for the watcher
    stream: bool = False  # an attach's: it wants progress and chunks


@dataclass(frozen=True, slots=True)
class Asked:
    """A process -> the asker: how many it found."""

    TYPE: ClassVar[str] = "broker.asked"
    token: str
    found: int


@dataclass(frozen=True, slots=True)
class Watched:
    """The process holding a request -> a process attached to it: an event, or
    (``final``) the answer, as the JSON text to pass on."""

    TYPE: ClassVar[str] = "broker.watched"
    key: str
    text: str
    final: bool = False
    mergeable: bool = False


@dataclass(frozen=True, slots=True)
class Notify:
    """Anyone -> every process (the group) -> its workers: a notification."""

    TYPE: ClassVar[str] = "broker.notify"
    message: Any
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CloseWorker:
    """A process -> the one holding a worker's connection: close it, saying why (a newer
    connection took its worker id)."""

    TYPE: ClassVar[str] = "broker.close_worker"
    connection: str
    reason: str
    code: int


@dataclass(frozen=True, slots=True)
class Gone:
    """A stopping process -> every process (the group): take over my unanswered jobs
    (from the job store); the first that does answers ``Asked(token, 1)``."""

    TYPE: ClassVar[str] = "broker.gone"
    process: str
    reply_to: str
    token: str


@dataclass(frozen=True, slots=True)
class Moved:
    """Every process (the group): the requests of the process at inbox ``old`` are now
    held by the one at ``new``; answers for them go there."""

    TYPE: ClassVar[str] = "broker.moved"
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class Adopt:
    """The process holding a request -> the one holding its worker's connection: the
    worker was running it before a restart (or a takeover): hold it for ``reply_to``."""

    TYPE: ClassVar[str] = "broker.adopt"
    key: str
    worker_id: str
    connection: str
    reply_to: str
    command: str
    timeout: float
    stream: bool = False


@dataclass(frozen=True, slots=True)
class Adopted:
    """The answer to :class:`Adopt`: whether the worker holds it (``held``), and where."""

    TYPE: ClassVar[str] = "broker.adopted"
    key: str
    worker_id: str
    connection: str
    inbox: str
    held: bool


@dataclass(frozen=True, slots=True)
class Holding:
    """The process a worker registered with -> every process (the group): it reports
    these jobs of before, which this process does not hold; their holders adopt them."""

    TYPE: ClassVar[str] = "broker.holding"
    worker_id: str
    connection: str
    inbox: str
    keys: list[str]


Event = (Forward | Reply | Lost | Progress | Chunk | ChunkAck | Cancel | Ask | Asked
         | Watched | Notify | CloseWorker | Gone | Moved | Adopt | Adopted | Holding)

_KINDS: dict[str, tuple[type[Any], tuple[str, ...]]] = {
    kind.TYPE: (kind, tuple(f.name for f in fields(kind)))
    for kind in (Forward, Reply, Lost, Progress, Chunk, ChunkAck, Cancel, Ask, Asked,
                 Watched, Notify, CloseWorker, Gone, Moved, Adopt, Adopted, Holding)}


class UnknownEvent(ValueError):
    """A layer message of no kind this process knows (a newer process's, or garbage)."""


def to_layer(event: Event) -> dict[str, Any]:
    """The event as a channel-layer message."""
    message = {name: getattr(event, name) for name in _KINDS[event.TYPE][1]}
    message["type"] = event.TYPE
    return message


def batch_to_layer(events: list[Event]) -> dict[str, Any]:
    """Events for one inbox as one layer message (one alone as itself)."""
    if len(events) == 1:
        return to_layer(events[0])
    return {"type": BATCH, "messages": [to_layer(e) for e in events]}


def from_layer(message: dict[str, Any]) -> Iterator[Event | UnknownEvent]:
    """The events a layer message carries (a batch carries several); a message that
    is no event this process knows comes as an :class:`UnknownEvent`, in its place."""
    for one in message["messages"] if message.get("type") == BATCH else [message]:
        try:
            yield _one(one)
        except UnknownEvent as exc:
            yield exc


def _one(message: dict[str, Any]) -> Event:
    kind = _KINDS.get(message.get("type"))  # type: ignore[arg-type]
    if kind is None:
        raise UnknownEvent(f"unknown layer message type {message.get('type')!r}")
    cls, names = kind
    try:
        values = [message[name] for name in names]
        if cls is Ask:  # enums travel as their value
            values[0] = AskKind(values[0])
        elif cls is Lost:
            values[4] = Departure(values[4])
    except (KeyError, ValueError) as exc:
        raise UnknownEvent(f"{cls.TYPE} with a missing or bad field: {exc}") from None
    return cls(*values)
