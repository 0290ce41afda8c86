"""Requests waiting for a free worker slot, in the order they are to be served.

Highest priority first; within one priority, round-robin between credentials (the
owner served least lately first), so that one tenant's burst cannot starve the
others; within one owner, first come first served.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar


class Waiting(Protocol):
    """What the queue looks at of a request."""

    priority: int
    owner: str  # the credential that sent it
    opened: float  # event-loop time it arrived


Request = TypeVar("Request", bound=Waiting)


class WaitQueue(Generic[Request]):
    """Requests waiting for a free slot: by priority, then round-robin by owner, then FIFO."""

    def __init__(self) -> None:
        self._levels: dict[int, dict[str, deque[Request]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, request: Request) -> None:
        owners = self._levels.setdefault(request.priority, {})
        owners.setdefault(request.owner, deque()).append(request)
        self._size += 1

    def oldest(self) -> float | None:
        """Event-loop time the longest-waiting request arrived (each owner's queue is
        FIFO, so only its head is looked at)."""
        return min((q[0].opened for owners in self._levels.values()
                    for q in owners.values() if q), default=None)

    def take_all(self) -> list[Request]:
        """Everything, in the order it is to be served: highest priority first; within
        one, one request of each owner in turn (the owner served least lately first)."""
        out: list[Request] = []
        for priority in sorted(self._levels, reverse=True):
            owners = self._levels[priority]
            while owners:
                for owner in list(owners):
                    queue = owners[owner]
                    out.append(queue.popleft())
                    if not queue:
                        del owners[owner]
        self._levels.clear()
        self._size = 0
        return out

    def put_front(self, requests: list[Request]) -> None:
        """Back where they were taken from, in their order, ahead of those that came
        meanwhile: each owner's requests in front of its queue, and the owners' turns
        as these requests had them (the owner that was next stays next)."""
        levels: dict[int, dict[str, deque[Request]]] = {}
        for request in requests:
            levels.setdefault(request.priority, {}).setdefault(request.owner,
                                                                deque()).append(request)
        for priority, owners in self._levels.items():  # those that came meanwhile
            front = levels.setdefault(priority, {})
            for owner, queue in owners.items():
                front.setdefault(owner, deque()).extend(queue)
        self._levels = levels
        self._size += len(requests)
