"""Whether a worker connection shows life: registered in time, heard from lately,
answering pings. No I/O: the link feeds it the clock and acts on its verdict.

A seed worker is pinged every other heartbeat interval. A quiet-heartbeat worker
beats every interval and is told nothing back, so it is pinged only once it has
missed a beat; one that beats is never pinged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Heartbeat intervals of silence after which a quiet-heartbeat worker is pinged: it
#: beats every interval, so one that is this late has missed a beat.
QUIET_PING_AFTER = 1.5


class Verdict(enum.Enum):
    """What a look at a connection's pulse says to do."""

    WELL = "well"  # nothing
    UNREGISTERED = "unregistered"  # no ``connect`` frame within REGISTER_TIMEOUT: close
    SILENT = "silent"  # no frame for HEARTBEAT_MISSES intervals: close
    DEAF = "deaf"  # talks, but answers no ping (it does not read): close
    PING = "ping"  # time to ping it


@dataclass(slots=True)
class Pulse:
    """The times that tell whether a connection lives (``time.monotonic()``)."""

    opened: float
    next_ping: float
    last_frame: float = 0.0
    #: When the oldest ping still unanswered was sent (None: all answered).
    ping_out: float | None = None

    @classmethod
    def started(cls, now: float, interval: float) -> Pulse:
        return cls(opened=now, next_ping=now + interval, last_frame=now)

    def quiet_enough(self, now: float, interval: float, quiet: bool) -> bool:
        """Nothing to look at: heard within the interval, no ping due or unanswered.
        Kept cheap: with tens of thousands of idle workers, this is most of the work."""
        return (self.ping_out is None and now - self.last_frame < QUIET_PING_AFTER * interval
                and (quiet or now < self.next_ping))

    def look(self, now: float, *, registered: bool, register_timeout: float,
             interval: float, misses: int, quiet: bool) -> Verdict:
        """What to do about the connection now (a PING is counted as sent)."""
        silence_limit = interval * misses
        if not registered:
            return Verdict.UNREGISTERED if now - self.opened > register_timeout \
                else Verdict.WELL
        if now - self.last_frame > silence_limit:
            return Verdict.SILENT
        if self.ping_out is not None and now - self.ping_out > silence_limit:
            return Verdict.DEAF
        if now >= self.next_ping and (
                not quiet or now - self.last_frame >= QUIET_PING_AFTER * interval):
            self.next_ping = now + 2 * interval
            if self.ping_out is None:
                self.ping_out = now
            return Verdict.PING
        return Verdict.WELL
