"""The requests one worker holds, and when each is due for the broker to act on it.

No I/O: the worker's link (:mod:`.links`) records what it sent and asks
:meth:`Held.due` what the clock says, then does it (frees a slot, tells the worker to
stop a hung job).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator

from workers.protocol import CHUNK_WINDOW

from ..balancing import Health
from .events import Adopt, Forward


@dataclass(slots=True)
class Assignment:
    """A request this worker has been given and has yet to answer."""

    reply_to: str  # the inbox of the process that holds the request
    started: float  # time.monotonic()
    deadline: float  # time.monotonic()
    size: int  # characters of the frame sent for it
    stream: bool = False  # the requester wants its progress and chunks
    lease: float | None = None  # seconds within which it must show life
    last_life: float = 0.0  # time.monotonic() of its last progress, chunk or start
    cancelled: float | None = None  # when the worker was told to stop it
    unacked: int = 0  # chunks passed on and not yet acknowledged to the worker
    #: What its slot's release will say about the worker, once it is cancelled: no
    #: verdict for a requester's cancel, a fault for a lease that ran out.
    verdict: Health = Health.UNKNOWN


    def chunk_passed(self) -> bool:
        """One more chunk passed on; False when its worker ignores the window (it may
        have CHUNK_WINDOW unacknowledged: twice as many leaves no doubt)."""
        self.unacked += 1
        return self.unacked <= 2 * CHUNK_WINDOW


class Due(enum.Enum):
    """What the clock says about one held request."""

    UNCONFIRMED = "unconfirmed"  # told to stop, never confirmed within the grace: free it
    TIMED_OUT = "timed out"  # past its deadline: free its slot
    HUNG = "hung"  # a leased job that showed no life for its lease


class Held:
    """The requests of one worker connection, by key, and the characters sent for them
    (what may wait unsent for the worker without cutting it off)."""

    def __init__(self) -> None:
        self.by_key: dict[str, Assignment] = {}
        self.chars = 0
        #: Jobs of before a restart the worker reported and no process adopted yet: the
        #: one that takes them over may still ask (:meth:`adopt`).
        self.pending: set[str] = set()

    def __len__(self) -> int:
        return len(self.by_key)

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def get(self, key: str) -> Assignment | None:
        return self.by_key.get(key)

    def add(self, key: str, assignment: Assignment) -> None:
        self.by_key[key] = assignment
        self.chars += assignment.size

    def take_on(self, forward: Forward, size: int, lease: float | None, now: float) -> None:
        """Hold a request given to the worker (``size``: characters of its frame)."""
        self.add(forward.key, Assignment(forward.reply_to, now, now + forward.timeout, size,
                                         forward.stream, lease, now))

    def adopt(self, adopt: Adopt, lease: float | None, now: float) -> bool:
        """Another process holds this request now: answers for it go there. True if the
        worker has it (held already, or reported at registration)."""
        assignment = self.by_key.get(adopt.key)
        if assignment is not None:
            assignment.reply_to = adopt.reply_to
            return True
        if adopt.key not in self.pending:
            return False
        self.pending.discard(adopt.key)
        self.add(adopt.key, Assignment(adopt.reply_to, now, now + adopt.timeout, 0,
                                       adopt.stream, lease, now))
        return True

    def moved(self, old: str, new: str) -> None:
        """The process at ``old`` handed its requests over to the one at ``new``."""
        for assignment in self.by_key.values():
            if assignment.reply_to == old:
                assignment.reply_to = new

    def take(self, key: str) -> Assignment | None:
        """Forget one (it was answered, or is freed); None if not held."""
        assignment = self.by_key.pop(key, None)
        if assignment is not None:
            self.chars -= assignment.size
        return assignment

    def take_all(self) -> dict[str, Assignment]:
        taken, self.by_key, self.chars = self.by_key, {}, 0
        return taken

    def due(self, now: float, grace: float) -> Iterator[tuple[str, Assignment, Due]]:
        """The held requests the broker must act on now; the freed ones are taken."""
        for key, assignment in list(self.by_key.items()):
            if assignment.cancelled is not None:
                if now - assignment.cancelled > grace:
                    self.take(key)
                    yield key, assignment, Due.UNCONFIRMED
            elif assignment.deadline < now:
                self.take(key)
                yield key, assignment, Due.TIMED_OUT
            elif assignment.lease is not None and now - assignment.last_life > assignment.lease:
                yield key, assignment, Due.HUNG
