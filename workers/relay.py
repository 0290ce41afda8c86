"""What the jobs send (answers, progress, chunks), carried across connections.

A broker that restarts, crashes or loses the network must not cost a job its work:
the job goes on, and what it sends meanwhile is held here, within bounds, until the
worker has registered again and the broker has said which jobs it adopts
(:attr:`~workers.protocol.Feature.RESUME`). Answers sent in the last seconds before
a connection broke are held too: the broker may have died before it read or stored
them, and it answers a copy it already has as late, harmlessly.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from .outbox import Outbox

logger = logging.getLogger("workers.client")

#: Frames held while away from the broker, and their characters, at most.
MAX_HELD_FRAMES = 10_000
MAX_HELD_CHARS = 16 * 1024 * 1024
#: Answers sent within this many seconds of a connection's end are held again.
UNCONFIRMED_SECONDS = 10.0
#: Answers remembered for that, at most.
MAX_RECENT = 1000


def adopted_jobs(answer: dict[str, Any]) -> set[str]:
    """The jobs the broker's answer to ``connect`` says it adopted."""
    adopted = answer.get("adopted")
    return {a for a in adopted if isinstance(a, str)} if isinstance(adopted, list) else set()


class Kind(enum.Enum):
    ANSWER = "answer"
    PROGRESS = "progress"  # only the newest of a job is worth holding
    CHUNK = "chunk"


class Relay:
    """The jobs' frames: sent while a session is live, held while there is none."""

    def __init__(self) -> None:
        self.outbox: Outbox | None = None
        self.live = False  # registered and resumed: frames go out at once
        #: request id -> its held frames, in the order they were sent
        self.held: OrderedDict[str, list[tuple[Kind, str]]] = OrderedDict()
        self.held_chars = self.held_frames = 0
        #: Jobs reported at registration that no broker process adopted yet: what they
        #: send is held until one does (:meth:`adopt`) or the grace ends (:meth:`forget`).
        self.pending: set[str] = set()
        self._recent: deque[tuple[float, str, str]] = deque(maxlen=MAX_RECENT)

    def attach(self, outbox: Outbox) -> None:
        """A new connection: frames still wait until :meth:`resume`."""
        self.outbox, self.live = outbox, False

    def detach(self) -> None:
        """The connection ended: hold what comes, and the answers it may have lost."""
        self.outbox, self.live = None, False
        cut = time.monotonic() - UNCONFIRMED_SECONDS
        for sent, request_id, text in self._recent:
            if sent >= cut and request_id not in self.held:
                self._hold(request_id, Kind.ANSWER, text)
        self._recent.clear()

    def held_ids(self) -> list[str]:
        return list(self.held)

    def resume(self, adopted: set[str], pending: set[str]) -> None:
        """Registered again: from now on frames go out (but the ``pending`` jobs', which
        another process may adopt yet); what jobs neither adopted nor pending held is
        dropped. What the adopted held goes with :meth:`adopt`."""
        self.pending = set(pending)
        if self.held or adopted or pending:
            logger.info("Jobs from before the reconnect: the broker took back %d; %d more "
                        "wait for another broker process to take them", len(adopted),
                        len(pending))
        self._drop(lambda request_id: request_id not in adopted | self.pending)
        self.live = self.outbox is not None

    async def adopt(self, adopted: Iterable[str]) -> None:
        """Send what these jobs hold, and from now on what they send."""
        for request_id in adopted:
            self.pending.discard(request_id)
            for kind, text in self._take(request_id):
                await self.send(request_id, kind, text)

    def forget(self) -> set[str]:
        """The grace for adoption is over: what pending jobs held is dropped; returns
        them (they are stopped)."""
        pending, self.pending = self.pending, set()
        self._drop(lambda request_id: request_id in pending)
        return pending

    def _take(self, request_id: str) -> list[tuple[Kind, str]]:
        frames = self.held.pop(request_id, [])
        for _, text in frames:
            self._count(-1, text)
        return frames

    def _drop(self, which: Callable[[str], bool]) -> None:
        dropped = sum(len(self._take(r)) for r in [r for r in self.held if which(r)])
        if dropped:
            logger.info("Dropped %d frame(s) of jobs the broker no longer has", dropped)

    async def send(self, request_id: str, kind: Kind, text: str) -> bool:
        """Send now if live, else hold; False if it had to be held."""
        if self.live and request_id not in self.pending and self.outbox is not None \
                and await self.outbox.send(text):
            if kind is Kind.ANSWER:
                self._recent.append((time.monotonic(), request_id, text))
            return True
        self._hold(request_id, kind, text)
        return False

    def _hold(self, request_id: str, kind: Kind, text: str) -> None:
        frames = self.held.setdefault(request_id, [])
        if kind is Kind.PROGRESS and frames and frames[-1][0] is Kind.PROGRESS:
            self._count(-1, frames.pop()[1])  # the newest says all
        frames.append((kind, text))
        self._count(1, text)
        while self.held and (self.held_chars > MAX_HELD_CHARS
                             or self.held_frames > MAX_HELD_FRAMES):
            oldest, lost = self.held.popitem(last=False)
            for _, dropped in lost:
                self._count(-1, dropped)
            logger.warning("Too much held for the broker: dropped what job %s sent", oldest)

    def _count(self, sign: int, text: str) -> None:
        self.held_frames += sign
        self.held_chars += sign * len(text)
