"""What a worker says about itself in its ``connect`` frame (:class:`Registration`),
and what it may ask of the broker beyond the seed's protocol (:class:`Feature`).

The broker checks every field here before a worker may take requests, so a bad
registration is refused with a reason instead of failing later, mid-request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import ProtocolError
from .fields import (MAX_COMMANDS, MAX_ID_CHARS, MAX_NAME_CHARS, MAX_PROTOCOL_TIMEOUT, _field,
                     _names, _seconds_or_weight, _text)
from .ids import random_id
from .labels import MAX_LABEL_CHARS, parse_labels
from .schemas import parse_schemas
from .text import quote

#: What a worker id may be made of: printable ASCII without spaces, so that no id can
#: pass for another in a log line or an admin page (a trailing zero-width space,
#: a full-width digit).
WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]+")
#: Requests a worker may list as held when it registers again.
MAX_JOBS = 10_000


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
    #: Jobs outlive the connection: when it drops, the worker goes on with them and
    #: keeps what they send; when it registers again (with any broker process) it lists
    #: them (``"jobs"``), and the broker's answer says which it adopts (``"adopted"``):
    #: their answers then go to the requesters, the others are cancelled.
    RESUME = "resume"

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
    #: What each command takes and does, for ``describe`` (see
    #: :func:`~workers.protocol.schemas.parse_schema`).
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What it asks of the broker beyond the seed's protocol (:class:`Feature`).
    features: frozenset[Feature] = frozenset()
    #: With :attr:`Feature.RESUME`: the requests it holds from an earlier connection
    #: (running, or answered lately and perhaps not heard), by their ids.
    jobs: list[str] = field(default_factory=list)
    #: Parsed only: why schemas the worker sent were not kept (its answer says so).
    schemas_dropped: list[str] = field(default_factory=list, compare=False)

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"worker_id": self.worker_id, "name": self.name,
                                "commands": self.commands, "weight": self.weight,
                                "max_concurrency": self.max_concurrency,
                                "no_retry": self.no_retry}
        for name in ("leases", "labels", "version", "hedge", "schemas", "jobs"):
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
        labels = parse_labels(data.get("labels"), "labels", claimed=True)
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
        jobs = _field(data, "jobs", list, [])
        if len(jobs) > MAX_JOBS or not all(
                isinstance(j, str) and 0 < len(j) <= MAX_ID_CHARS for j in jobs):
            raise ProtocolError(f"Field 'jobs' must list at most {MAX_JOBS} request ids")
        return cls(worker_id=worker_id, name=name,
                   commands=commands, weight=weight, max_concurrency=max_concurrency,
                   no_retry=no_retry, leases={k: float(v) for k, v in leases.items()},
                   labels=labels, version=version, hedge=hedge, schemas=schemas,
                   features=Feature.parse(data.get("features")), jobs=jobs,
                   schemas_dropped=dropped)
