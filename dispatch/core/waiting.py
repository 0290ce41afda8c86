"""Requests waiting for a free worker slot, in the order they are to be served.

Highest priority first; within one priority, round-robin between credentials (the
owner served least lately first), so that one tenant's burst cannot starve the
others; within one owner, first come first served. The places are shared too: when
the queue is full, a newcomer may push out the newest request of the owner holding
the most (:meth:`WaitQueue.make_room`), so one tenant that fills the queue and leaves
does not keep the others out.
"""

from __future__ import annotations

from collections import Counter, deque
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
        self._held: Counter[str] = Counter()  # owner -> its requests in the queue

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, request: Request) -> None:
        owners = self._levels.setdefault(request.priority, {})
        owners.setdefault(request.owner, deque()).append(request)
        self._size += 1
        self._held[request.owner] += 1

    def make_room(self, owner: str) -> Request | None:
        """The queue is full and ``owner`` has a request for it: take out and return the
        newest (of the lowest priority) of the owner holding the most, if that owner
        holds at least two more than ``owner``; None if places are shared fairly."""
        most, count = max(self._held.items(), key=lambda item: item[1], default=("", 0))
        if count < self._held[owner] + 2:
            return None
        for priority in sorted(self._levels):
            queue = self._levels[priority].get(most)
            if queue:
                pushed = queue.pop()
                if not queue:
                    del self._levels[priority][most]
                self._size -= 1
                self._held[most] -= 1
                return pushed
        return None  # unreachable while _held is true to the queue

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
        self._held.clear()
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
        self._held.update(r.owner for r in requests)
