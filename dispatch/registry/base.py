"""The registry interface and what it holds: one entry per worker, reservations.

The hot operation is :meth:`Registry.reserve`: choose a worker for a command *and*
take one of its slots in one step, so that two requests can never both take the
last free slot.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple

from .. import conf
from ..balancing import (EWMA_ALPHA, Health, Wanted, WorkerState, ejection_due,
                         ejection_seconds, parse_canaries, peak_ewma, worker_state)

log = logging.getLogger("dispatch.registry")


def canary_rules() -> dict[str, tuple[str, float]]:
    """The ``CANARY`` setting, parsed (once per value)."""
    return _canaries(conf.get("CANARY"))


@functools.lru_cache(maxsize=4)
def _canaries(text: str) -> dict[str, tuple[str, float]]:
    return parse_canaries(text)


@functools.lru_cache(maxsize=1)
def _salt(secret: str) -> str:
    return hashlib.sha256(f"dispatch affinity\0{secret}".encode()).hexdigest()[:32]


def affinity_salt() -> str:
    """The secret mixed into affinity hashing: from ``SECRET_KEY``, so every broker
    process of a cluster places keys alike and no worker can aim its id at a key."""
    from django.conf import settings

    return _salt(settings.SECRET_KEY)


def ejection_reason(failures: int) -> str:
    """Why a worker is out of rotation, as the registries record and show it."""
    return f"{failures or 1} infrastructure failure(s) in a row"


def log_ejection(worker_id: str, failures: int, until: float | None, why: str) -> None:
    """Log an ejection, or (``until`` None) one refused by EJECT_MAX_SHARE."""
    if until is None:
        log.warning("worker %s failed %d times in a row, but too many workers are out of "
                    "rotation already: it stays in", worker_id, failures)
    else:
        log.warning("worker %s is out of rotation until %s (%s)", worker_id,
                    time.strftime("%H:%M:%S", time.localtime(until)), why)


@dataclass(slots=True)
class WorkerEntry:
    """One connected worker, as the broker sees it."""

    worker_id: str
    name: str
    connection: str  # the name of its connection (worker.<session>) in its process
    commands: frozenset[str]
    weight: float = 1.0
    max_concurrency: int = 16
    process: str = ""
    address: str = ""
    session_id: str = ""
    connected_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    in_flight: int = 0
    completed: int = 0
    errors: int = 0
    latency_ms: float = 0.0
    error_rate: float = 0.0
    draining: bool = False
    no_retry: frozenset[str] = frozenset()  # commands never re-sent elsewhere
    inbox: str = ""  # channel of the dispatcher of the process that holds its socket
    owner: str = ""  # the credential that registered this id (auth.Grant.owner)
    leases: dict[str, float] = field(default_factory=dict)  # command -> seconds of life
    labels: dict[str, str] = field(default_factory=dict)  # what selectors match
    version: str = ""  # for canary routing
    hedge: frozenset[str] = frozenset()  # commands it lets the broker hedge
    latency_at: float = 0.0  # wall time of the last latency sample
    failures: int = 0  # infrastructure failures in a row
    ejections: int = 0  # times it was taken out of rotation
    ejected_until: float = 0.0  # wall time; 0: never ejected
    probing: bool = False  # ejected before: on trial until one request succeeds
    ejected_why: str = ""
    #: Its commands' schemas as compact JSON ({command: schema}, "" for none): text is
    #: cheap to copy in to_dict and to store; only describe reads it (in Redis it has a
    #: key of its own, so that reserve, release and get never move it).
    schemas: str = ""

    @property
    def state(self) -> WorkerState:
        return worker_state(self, time.time())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view for the control API and management commands."""
        data = asdict(self)
        data["commands"] = sorted(self.commands)
        data["no_retry"] = sorted(self.no_retry)
        data["hedge"] = sorted(self.hedge)
        data["state"] = self.state
        del data["connection"], data["inbox"], data["owner"], data["leases"], data["schemas"]
        return data

    def record(self, latency_ms: float | None, health: Health, now: float) -> bool:
        """Fold one outcome into the statistics (MemoryRegistry; release.lua is its twin
        in Redis); True when it is time to eject the worker."""
        self.in_flight = max(0, self.in_flight - 1)
        probing = self.probing
        ok = health is Health.OK
        if ok:
            self.completed += 1
            self.failures = 0
            self.probing = False  # a probe that succeeded: back in rotation
        elif health is not Health.UNKNOWN:
            self.errors += 1
            self.failures += health is Health.FAULT
        if health is not Health.UNKNOWN:
            self.error_rate += EWMA_ALPHA * ((0.0 if ok else 1.0) - self.error_rate)
        fresh = ok and probing  # a probe that succeeded: back with a clean slate
        if fresh:
            self.error_rate = 0.0
        if latency_ms is not None:
            self.latency_ms = latency_ms if fresh else peak_ewma(
                self.latency_ms, self.latency_at, latency_ms, now)
            self.latency_at = now
        return ejection_due(self.failures, probing, health, conf.get("EJECT_AFTER"),
                            self.ejected_until, now)

    def standing(self) -> Standing:
        """What outlives its connection: its ejections (so that reconnecting neither
        ends one nor resets the doubling)."""
        return Standing(self.ejections, self.ejected_until, self.ejected_why)

    def inherit(self, standing: Standing, now: float) -> None:
        """Take on the standing of an earlier connection with the same id."""
        self.ejections, self.ejected_until, self.ejected_why = standing
        self.probing = self.probing or self.ejected_until > now

    def eject(self, now: float, why: str) -> None:
        self.ejections += 1
        self.ejected_until = now + ejection_seconds(self.ejections, conf.get("EJECT_SECONDS"),
                                                    conf.get("EJECT_MAX_SECONDS"))
        self.probing = True
        self.ejected_why = why
        self.failures = 0


class Standing(NamedTuple):
    """A worker's ejection record, kept with its id while the id is claimed."""

    ejections: int = 0
    ejected_until: float = 0.0
    ejected_why: str = ""


class Reservation(NamedTuple):
    """Outcome of :meth:`Registry.reserve`.

    ``worker`` is set when a slot was taken. Otherwise ``capable`` tells "nobody
    offers this command" (answer at once) from "all capable workers are full"
    (wait for a slot). ``why`` says how it was chosen (for history); ``unmatched``
    names a selector that matched no live worker.
    """

    worker: WorkerEntry | None
    capable: bool
    why: str = ""
    unmatched: str = ""


#: What :meth:`Registry.release_many` takes: (worker id, latency in ms, health).
Outcome = tuple[str, "float | None", Health]


class Registry(abc.ABC):
    """What the dispatcher needs to know and change about workers."""

    #: True when no call waits on I/O (one process): callers then need not batch.
    local = False

    @abc.abstractmethod
    async def add(self, entry: WorkerEntry) -> WorkerEntry | None:
        """Register a worker; returns the entry it replaced (same id), if any.

        Raises :class:`WorkerIdTaken` if the id belongs to another ``owner``.
        """

    @abc.abstractmethod
    async def remove(self, worker_id: str, connection: str) -> WorkerEntry | None:
        """Unregister, but only if ``connection`` still owns the id (a takeover keeps it)."""

    @abc.abstractmethod
    async def touch(self, worker_id: str, when: float | None = None) -> bool:
        """Record a heartbeat; False if the worker is not registered (any more)."""

    async def reserve(self, command: str, *, worker_id: str | None = None) -> Reservation:
        """Choose a worker for ``command`` (or take ``worker_id``) and take a slot."""
        return (await self.reserve_many([Wanted(command, worker_id)]))[0]

    @abc.abstractmethod
    async def reserve_many(self, wanted: list[Wanted]) -> list[Reservation]:
        """Choose a worker for each and take a slot of it, in order (choices count
        against each other). A shared registry does them in a couple of round trips,
        whatever their number."""

    @abc.abstractmethod
    async def release(self, worker_id: str, *, latency_ms: float | None,
                      health: Health) -> None:
        """Give back a slot, folding the outcome into the worker's statistics.

        Enough :attr:`Health.FAULT` in a row eject the worker (see
        :mod:`dispatch.balancing`); a handler's own error is no ill health.
        """

    @abc.abstractmethod
    async def explain(self, wanted: Wanted) -> tuple[Reservation, list[WorkerEntry]]:
        """How ``wanted`` would be routed now (no slot is taken), and every worker
        looked at."""

    async def release_many(self, outcomes: list[Outcome]) -> None:
        """:meth:`release` for each ``(worker_id, latency_ms, health)``."""
        for worker_id, latency_ms, health in outcomes:
            await self.release(worker_id, latency_ms=latency_ms, health=health)

    @abc.abstractmethod
    async def set_draining(self, worker_id: str, draining: bool) -> bool:
        """Take a worker out of rotation (or back); False if unknown."""

    @abc.abstractmethod
    async def get(self, worker_id: str) -> WorkerEntry | None:
        """One worker, or None."""

    @abc.abstractmethod
    async def all(self) -> list[WorkerEntry]:
        """Every live worker."""

    async def count(self) -> int:
        return len(await self.all())

    async def described(self) -> list[WorkerEntry]:
        """Every live worker with its :attr:`~WorkerEntry.schemas` (which a shared
        registry's other reads leave empty)."""
        return await self.all()

    # Broker processes, for a registry shared by several (not ``local``):

    async def process_alive(self, process: str, ttl: float) -> None:
        """Declare ``process`` alive for ``ttl`` more seconds."""
        raise NotImplementedError

    async def process_gone(self, process: str) -> None:
        """Say goodbye at a clean shutdown, so that others need not wait for the ttl."""
        raise NotImplementedError

    async def live_processes(self) -> set[str]:
        """Names of the processes whose last :meth:`process_alive` has not run out."""
        raise NotImplementedError

    async def connections(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """The connection of each of these workers that is still live; the dead are left
        out."""
        found = {}
        for worker_id in set(worker_ids):
            entry = await self.get(worker_id)
            if entry is not None:
                found[worker_id] = entry.connection
        return found
