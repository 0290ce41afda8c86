"""The registry interface and what it holds: one entry per worker, reservations.

The hot operation is :meth:`Registry.reserve`: choose a worker for a command *and*
take one of its slots in one step, so that two requests can never both take the
last free slot.
"""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple

#: Weight of the newest sample in the running averages of latency and errors.
EWMA_ALPHA = 0.2


def has_room(in_flight: int, max_concurrency: int, draining: bool = False) -> bool:
    """The one rule for a free slot (prelude.lua's ``has_room`` is its twin in Redis)."""
    return not draining and in_flight < max_concurrency


@dataclass(slots=True)
class WorkerEntry:
    """One connected worker, as the broker sees it."""

    worker_id: str
    name: str
    channel: str  # the name of its connection (worker.<session>), not a layer channel
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

    def has_room(self) -> bool:
        return has_room(self.in_flight, self.max_concurrency, self.draining)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view for the control API and management commands."""
        data = asdict(self)
        data["commands"] = sorted(self.commands)
        data["no_retry"] = sorted(self.no_retry)
        del data["channel"], data["inbox"], data["owner"], data["leases"]
        return data


class Reservation(NamedTuple):
    """Outcome of :meth:`Registry.reserve`.

    ``worker`` is set when a slot was taken. Otherwise ``capable`` tells "nobody
    offers this command" (answer at once) from "all capable workers are full"
    (wait for a slot).
    """

    worker: WorkerEntry | None
    capable: bool


class RegistryUnavailable(ConnectionError):
    """The shared registry cannot be reached (Redis down): requests get an error answer."""


class WorkerIdTaken(Exception):
    """The worker id is registered, or was lately, by another credential.

    An id stays with its owner while it is registered and for
    ``WORKER_ID_CLAIM_SECONDS`` after it leaves, so that another credential cannot
    slip in while the worker reconnects.
    """


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
    async def remove(self, worker_id: str, channel: str) -> WorkerEntry | None:
        """Unregister, but only if ``channel`` still owns the id (a takeover keeps it)."""

    @abc.abstractmethod
    async def touch(self, worker_id: str, when: float | None = None) -> bool:
        """Record a heartbeat; False if the worker is not registered (any more)."""

    @abc.abstractmethod
    async def reserve(self, command: str, *, worker_id: str | None = None) -> Reservation:
        """Choose a worker for ``command`` (or take ``worker_id``) and take a slot."""

    @abc.abstractmethod
    async def release(self, worker_id: str, *, latency_ms: float | None, ok: bool) -> None:
        """Give back a slot, folding the outcome into the worker's statistics."""

    async def reserve_many(self, requests: list[tuple[str, str | None]]) -> list[Reservation]:
        """:meth:`reserve` for each ``(command, worker_id)``, in order.

        A shared registry does them in a couple of round trips, whatever their number.
        """
        return [await self.reserve(command, worker_id=worker_id)
                for command, worker_id in requests]

    async def release_many(self, outcomes: list[tuple[str, float | None, bool]]) -> None:
        """:meth:`release` for each ``(worker_id, latency_ms, ok)``."""
        for worker_id, latency_ms, ok in outcomes:
            await self.release(worker_id, latency_ms=latency_ms, ok=ok)

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

    async def channels(self, worker_ids: Iterable[str]) -> dict[str, str]:
        """Channel of each of these workers that is still live; the dead are left out."""
        found = {}
        for worker_id in set(worker_ids):
            entry = await self.get(worker_id)
            if entry is not None:
                found[worker_id] = entry.channel
        return found
