"""Load-balancing strategies: small pure functions over worker statistics.

A strategy gets the candidates (workers that offer the command and have a free
slot) and returns the one to use. It never sees sockets or the registry, so the
in-process and the Redis registry choose the same way, and tests need no broker.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence


class WorkerStats(Protocol):
    """What a strategy may look at."""

    worker_id: str
    weight: float
    in_flight: int
    max_concurrency: int
    latency_ms: float
    error_rate: float


#: (candidates, sequence number of this choice, random source) -> chosen candidate.
Strategy = Callable[[Sequence[WorkerStats], int, random.Random], WorkerStats]

#: Latency assumed for a worker not yet measured; low, so that new workers get tried.
UNMEASURED_LATENCY_MS = 1.0


def load_score(w: WorkerStats) -> float:
    """Expected cost of sending one more request to ``w``; lower is better.

    Requests already in flight (plus this one) times the recent response time,
    divided by weight, and inflated by the share of recent failures, so that a
    slow, busy, light or failing worker each get less.
    """
    latency = max(w.latency_ms, UNMEASURED_LATENCY_MS)
    health = 1.0 + 4.0 * w.error_rate
    return (w.in_flight + 1) * latency * health / w.weight


def least_loaded(candidates: Sequence[WorkerStats], seq: int, rng: random.Random) -> WorkerStats:
    """Lowest :func:`load_score`; ties broken at random so equals share the work."""
    best = min(load_score(w) for w in candidates)
    tied = [w for w in candidates if load_score(w) <= best * (1 + 1e-9)]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def round_robin(candidates: Sequence[WorkerStats], seq: int, rng: random.Random) -> WorkerStats:
    """Each in turn, in a stable order (by worker id) whatever order they come in."""
    ordered = sorted(candidates, key=lambda w: w.worker_id)
    return ordered[seq % len(ordered)]


def random_choice(candidates: Sequence[WorkerStats], seq: int, rng: random.Random) -> WorkerStats:
    """Uniformly at random."""
    return rng.choice(list(candidates))


def weighted_random(candidates: Sequence[WorkerStats], seq: int, rng: random.Random
                    ) -> WorkerStats:
    """At random, in proportion to weight."""
    return rng.choices(list(candidates), weights=[w.weight for w in candidates])[0]


STRATEGIES: dict[str, Strategy] = {
    "least_loaded": least_loaded,
    "round_robin": round_robin,
    "random": random_choice,
    "weighted_random": weighted_random,
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; a clear error lists the valid names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"Unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}"
        ) from None
