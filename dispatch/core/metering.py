"""What one broker process has seen, counted cheaply: the source of /metrics and the
dashboard's charts.

Counting happens on the hot path (once per answered request), so it is plain
integers in dicts and a bisect into fixed buckets: about a microsecond. Turning
counts into Prometheus text or chart series happens only when someone looks.

Everything is per process. Command names come from requesters, so at most
:data:`MAX_COMMANDS` distinct ones are kept apart, and a name gets its own counts
only once an answer did not say that no worker offers it; the rest count as
``(other)``, which keeps a flood of made-up names from growing memory or the
metrics' labels, or from taking the places of real commands.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from workers.protocol import WORKER_ANSWER_CODES, ErrorCode

#: Upper bounds of the latency buckets Prometheus is shown, in ms (the last: +Inf).
BUCKETS_MS: tuple[float, ...] = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000,
                                 10_000, 30_000, 60_000, 300_000)
#: The buckets counted: each of those split in four steps of equal ratio (quantiles
#: for the dashboard within ~15%), from 0.1 ms; every bound of BUCKETS_MS is one of these.
FINE_MS: tuple[float, ...] = tuple(sorted({round(low * (high / low) ** (i / 4), 4)
                                           for low, high in zip((0.1, *BUCKETS_MS[:-1]),
                                                                BUCKETS_MS)
                                           for i in range(1, 5)}))
MAX_COMMANDS = 200
OTHER = "(other)"
SERIES_SECONDS = 300  # the dashboard's charts: the last five minutes, per second
RECENT_FAILURES = 200
#: The outcome label of a successful answer (a failure's is its ErrorCode, or FAILED).
OK = "ok"
FAILED = "error"
#: Outcomes of requests a worker ran and that failed (the rest of the failures were
#: answered by the broker: no worker, timeout, worker lost, cancelled...).
RAN_AND_FAILED = frozenset({FAILED, *(code.value for code in WORKER_ANSWER_CODES)})



class Histogram:
    """Counts per latency bucket (:data:`FINE_MS`); quantiles are read back by
    interpolating in a bucket."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(FINE_MS) + 1)
        self.sum = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(FINE_MS, ms)] += 1
        self.sum += ms

    def add(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The q-quantile in ms, None without samples; within a bucket, linear."""
        total = self.count
        if not total:
            return None
        rank, seen = q * total, 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = FINE_MS[i - 1] if i else 0.0
                high = FINE_MS[i] if i < len(FINE_MS) else FINE_MS[-1] * 2
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return FINE_MS[-1]

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound in ms, answers at or under it) for each of :data:`BUCKETS_MS`, then
        (inf, all): Prometheus' buckets."""
        running = list(itertools.accumulate(self.counts))
        return [(bound, running[FINE_MS.index(bound)]) for bound in BUCKETS_MS] + \
            [(float("inf"), running[-1])]


@dataclass(slots=True)
class CommandMeter:
    outcomes: Counter[str] = field(default_factory=Counter)  # OK or an error code
    latency: Histogram = field(default_factory=Histogram)


@dataclass(slots=True)
class Second:
    """One second of answers, for the charts."""

    at: int
    answered: int = 0
    failed: int = 0
    latency: Histogram = field(default_factory=Histogram)


@dataclass(slots=True, frozen=True)
class Failure:
    at: float
    command: str
    code: str
    error: str
    worker_id: str
    request_id: str


class Meter:
    """The counts of one process (:data:`meter`). ``answered`` is the hot path; the
    rest is rare."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.commands: dict[str, CommandMeter] = {}
        self.series: deque[Second] = deque(maxlen=SERIES_SECONDS)
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)
        #: retries, failovers and hedges (the dispatcher's own stats count layer and
        #: registry errors)
        self.events: Counter[str] = Counter()
        #: (socket kind, CloseCode name): connections the broker refused or closed
        self.closed: Counter[tuple[str, str]] = Counter()
        #: (socket kind, ErrorCode value): frames refused with an error, socket kept
        self.refused_frames: Counter[tuple[str, str]] = Counter()

    def answered(self, command: str, success: bool, code: str | None, latency_ms: float, *,
                 attempts: int = 1, workers_lost: int = 0, hedged: bool = False,
                 error: str | None = None, worker_id: str | None = None,
                 request_id: str = "") -> None:
        """One request answered; a failure without an error code counts as ``error``."""
        outcome = OK if success else code or FAILED
        meter = self.commands.get(command)
        if meter is None:
            meter = self._new_command(command, outcome)
        meter.outcomes[outcome] += 1
        meter.latency.observe(latency_ms)
        now = self.clock()
        second = self.series[-1] if self.series else None
        if second is None or second.at != int(now):
            second = Second(int(now))
            self.series.append(second)
        second.answered += 1
        second.latency.observe(latency_ms)
        if attempts > 1:
            self.events["retries"] += attempts - 1 - hedged
        if workers_lost:
            self.events["failovers"] += workers_lost
        if hedged:
            self.events["hedges"] += 1
        if not success:
            second.failed += 1
            self.failures.append(Failure(now, command, outcome, (error or "")[:200],
                                         worker_id or "", request_id[:64]))

    def _new_command(self, command: str, outcome: str) -> CommandMeter:
        """A command's own counts from its first answer, unless that answer says no
        worker offers it: made-up names must not take the places of real commands."""
        if len(self.commands) >= MAX_COMMANDS or outcome == ErrorCode.NO_WORKERS.value:
            return self.commands.setdefault(OTHER, CommandMeter())
        return self.commands.setdefault(command, CommandMeter())

    def window(self, seconds: int = SERIES_SECONDS) -> list[dict[str, Any]]:
        """Per second of the last ``seconds`` (quiet seconds as zeros): answers,
        failures, p50 and p99 in ms."""
        now = int(self.clock())
        by_second = {s.at: s for s in self.series}
        out = []
        for at in range(now - seconds + 1, now + 1):
            s = by_second.get(at)
            out.append({"t": at, "answered": s.answered if s else 0,
                        "failed": s.failed if s else 0,
                        "p50": _round(s.latency.quantile(0.5)) if s else None,
                        "p99": _round(s.latency.quantile(0.99)) if s else None})
        return out

    def command_summary(self) -> dict[str, dict[str, Any]]:
        """Per command since start: answers, failures (``errors``: its worker ran it and
        it failed; ``unserved``: the broker answered, no worker's result), p50/p99 (ms)."""
        out = {}
        for name, meter in self.commands.items():
            total = sum(meter.outcomes.values())
            failed = total - meter.outcomes[OK]
            errors = sum(n for outcome, n in meter.outcomes.items() if outcome in RAN_AND_FAILED)
            out[name] = {"answered": total, "failed": failed, "errors": errors,
                         "unserved": failed - errors,
                         "p50_ms": _round(meter.latency.quantile(0.5)),
                         "p99_ms": _round(meter.latency.quantile(0.99))}
        return out


def _round(ms: float | None) -> float | None:
    if ms is None:
        return None
    return round(ms, 2 if ms < 10 else 1 if ms < 100 else 0)


#: This process's counts (the dispatcher's and the sockets').
meter = Meter()
