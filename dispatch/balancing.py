"""Choosing a worker: pure functions over worker statistics, one path for both registries.

The registry hands :func:`choose` the live workers that offer the command (all of
them, or a random sample when there are many) and what the request wants
(:class:`Wanted`: a named worker, a label selector, an affinity key, workers to
avoid); it returns a :class:`Choice`: the worker to take a slot of, whether anyone
is capable at all, and why (for the history row and ``manage.py explain``). It
never sees sockets or the registry, so the in-process and the Redis registry choose
the same way, and tests need no broker.

``least_loaded`` follows the proxies that balance at scale (Finagle's and tower's
peak-EWMA with power of two choices): each worker's latency estimate jumps up with a
slow answer (by at most PEAK_STEP per answer), comes down gently with fast ones, and
decays toward "fast" while the worker is not used, so a worker measured once as slow
is tried again; of two eligible workers drawn at random, the one with the lower
expected cost wins (by odds that grow with the gap; near-equals take turns). That
costs the same with ten workers as with ten thousand. Affinity keys use a
consistent-hash :class:`Ring` (O(log n)).

Ejection (Envoy's outlier detection): a worker with ``EJECT_AFTER`` infrastructure
faults in a row (:attr:`Health.FAULT`: leases that ran out; never a handler's own
error, and never a timeout, a cancel or an answer refused as too large, which
requesters choose, or choose with the worker) is out of rotation for
``EJECT_SECONDS``, doubled each time it happens again (up to ``EJECT_MAX_SECONDS``),
never more than ``EJECT_MAX_SHARE`` of the fleet at once; when its time is up it
gets the next request, a probe (one at a time), and is back with a clean slate on
success, or out again for twice as long on failure.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

#: Latency assumed for a worker not yet measured (and the one estimates decay to):
#: low, so that new and idle workers get tried.
UNMEASURED_LATENCY_MS = 1.0
#: Weight of the newest sample in the latency average, when it is not a new peak.
EWMA_ALPHA = 0.3
#: A slower answer raises the estimate at once, but by at most this factor per answer:
#: one hiccup (a GC pause, a busy core) must not put a worker out of favour for long,
#: while a worker that stays slow reaches its figure in a few answers.
PEAK_STEP = 1.5
#: Seconds in which an unused worker's latency estimate decays by a factor e.
LATENCY_DECAY_SECONDS = 10.0
#: Scores within this factor of each other are equal for least_loaded: latency noise.
NEAR = 1.5
#: With more capable workers than this, a random sample of this many is looked at
#: (per choice); a sample in which none is eligible falls back to looking at all.
SAMPLE = 8


class WorkerStats(Protocol):
    """What choosing may look at (a WorkerEntry, or a row the Redis registry read)."""

    worker_id: str
    weight: float
    in_flight: int
    max_concurrency: int
    draining: bool
    latency_ms: float
    latency_at: float  # wall time of the last latency sample
    error_rate: float
    ejected_until: float  # wall time; 0: never ejected
    probing: bool  # ejected once: on trial until one request succeeds
    labels: dict[str, str]
    version: str


@dataclass(frozen=True, slots=True)
class Wanted:
    """What one request asks of its worker."""

    command: str
    target: str | None = None  # a worker chosen by the caller (broker -> worker `send`)
    select: tuple[tuple[str, str], ...] = ()  # labels the worker must have
    affinity: str | None = None  # requests with one key go to one worker
    avoid: frozenset[str] = frozenset()  # workers it must not go to (a hedge's twin)

    def selector_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.select)


def selector(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    """A request's ``select`` labels in the form :class:`Wanted` holds (hashable, one
    spelling for one selector)."""
    return tuple(sorted((labels or {}).items()))


def matches(w: WorkerStats, select: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``w`` has every label of the selector."""
    return all(w.labels.get(k) == v for k, v in select)


@dataclass(slots=True)
class Choice:
    """The outcome of choosing: ``worker`` set when one was chosen."""

    worker: Any = None
    capable: bool = False  # some live worker offers it (and matches the selector)
    why: str = ""  # compact: strategy, candidates, exclusions, scores
    unmatched: str = ""  # the selector that matched no live worker


# ---------------------------------------------------------------------------- statistics


def decayed(latency_ms: float, latency_at: float, now: float) -> float:
    """The latency estimate at ``now``: it fades toward UNMEASURED while unused."""
    if latency_ms <= UNMEASURED_LATENCY_MS or latency_at <= 0:
        return max(latency_ms, UNMEASURED_LATENCY_MS)
    fade = math.exp(-max(0.0, now - latency_at) / LATENCY_DECAY_SECONDS)
    return UNMEASURED_LATENCY_MS + (latency_ms - UNMEASURED_LATENCY_MS) * fade


def peak_ewma(latency_ms: float, latency_at: float, sample: float, now: float) -> float:
    """The new estimate after a sample: a peak is taken at once (up to PEAK_STEP times
    the estimate; the first sample whole), a dip gently."""
    if latency_at <= 0:
        return sample
    current = decayed(latency_ms, latency_at, now)
    if sample > current:
        return min(sample, current * PEAK_STEP)
    return current + EWMA_ALPHA * (sample - current)


def load_score(w: WorkerStats, now: float) -> float:
    """Expected cost of sending one more request to ``w``; lower is better.

    Requests already in flight (plus this one) times the recent response time,
    divided by weight, and inflated by the share of recent failures the worker did not
    mean (:class:`Health`), so that a slow, busy, light or failing worker each get less.
    """
    return (w.in_flight + 1) * decayed(w.latency_ms, w.latency_at, now) * \
        (1.0 + 4.0 * w.error_rate) / w.weight


class WorkerState(enum.StrEnum):
    """A worker's place in rotation, as the registries, the pages and the tables say it."""

    ONLINE = "online"
    DRAINING = "draining"  # leaving: what it holds finishes, nothing new comes
    EJECTED = "ejected"  # out of rotation after infrastructure faults
    PROBING = "probing"  # back from an ejection, on trial: one request at a time
    FULL = "full"  # as many requests as its max_concurrency (a reason to pass it over)


def worker_state(w: WorkerStats, now: float) -> WorkerState:
    """Where ``w`` stands (wall time ``now``), whatever it holds."""
    if w.draining:
        return WorkerState.DRAINING
    if w.ejected_until > now:
        return WorkerState.EJECTED
    return WorkerState.PROBING if w.probing else WorkerState.ONLINE


def unavailable(w: WorkerStats, now: float) -> WorkerState | None:
    """Why ``w`` can take no request now (None: it can)."""
    if w.draining:  # worker_state's tests, inline: this runs for every candidate
        return WorkerState.DRAINING
    if w.ejected_until > now:
        return WorkerState.EJECTED
    if w.probing and w.in_flight:  # on trial: one request at a time until it succeeds
        return WorkerState.PROBING
    return WorkerState.FULL if w.in_flight >= w.max_concurrency else None


# ---------------------------------------------------------------------------- strategies

#: (eligible candidates, sequence number of this choice, random source, now) -> chosen.
Strategy = Callable[[Sequence[WorkerStats], int, random.Random, float], WorkerStats]


def least_loaded(candidates: Sequence[WorkerStats], seq: int, rng: random.Random,
                 now: float) -> WorkerStats:
    """Power of two choices over :func:`load_score`, of two drawn at random:

    * the one with less in flight per weight wins if its score is lower too (that part
      of the score is exact, not a noisy estimate);
    * else, of two within NEAR of each other, the one that answered least recently;
    * else the lower score wins with odds of the scores' ratio (2x cheaper wins 2 times
      in 3, 9x 9 in 10).

    Not always the lower score: latencies are noisy, and a worker that lost by a hair
    every time would never be used, so its figure would never be corrected; with
    sequential requests (nothing in flight) equal workers would split by their first
    samples. Near-equals taken in turn share sequential load evenly.
    """
    n = len(candidates)
    if n == 1:
        return candidates[0]
    # Two distinct at random (what rng.sample does, at a tenth of its cost).
    i = int(rng.random() * n)
    j = int(rng.random() * (n - 1))
    a, b = candidates[i], candidates[j + (j >= i)]
    score_a, score_b = load_score(a, now), load_score(b, now)
    load_a, load_b = (a.in_flight + 1) / a.weight, (b.in_flight + 1) / b.weight
    if load_a != load_b and (load_a < load_b) == (score_a < score_b):
        return a if score_a < score_b else b
    if max(score_a, score_b) <= NEAR * min(score_a, score_b):
        return a if a.latency_at <= b.latency_at else b
    return a if rng.random() * (score_a + score_b) < score_b else b


def round_robin(candidates: Sequence[WorkerStats], seq: int, rng: random.Random,
                now: float) -> WorkerStats:
    """Each in turn, in a stable order (by worker id) whatever order they come in."""
    ordered = sorted(candidates, key=lambda w: w.worker_id)
    return ordered[seq % len(ordered)]


def random_choice(candidates: Sequence[WorkerStats], seq: int, rng: random.Random,
                  now: float) -> WorkerStats:
    """Uniformly at random."""
    return rng.choice(list(candidates))


def weighted_random(candidates: Sequence[WorkerStats], seq: int, rng: random.Random,
                    now: float) -> WorkerStats:
    """At random, in proportion to weight."""
    return rng.choices(list(candidates), weights=[w.weight for w in candidates])[0]


STRATEGIES: dict[str, Strategy] = {
    "least_loaded": least_loaded,
    "round_robin": round_robin,
    "random": random_choice,
    "weighted_random": weighted_random,
}
#: Strategies that choose as well from a random sample as from all (so many workers
#: cost no more than a few).
SAMPLING = frozenset({"least_loaded", "random"})


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; a clear error lists the valid names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"Unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}"
        ) from None


def samples(strategy: str, wanted: Wanted, canaries: dict[str, tuple[str, float]]) -> bool:
    """Whether a random sample of the candidates will do for this request (the
    registries find a selector's workers by label, so those may be sampled too)."""
    return strategy in SAMPLING and wanted.affinity is None and wanted.target is None \
        and wanted.command not in canaries


# ---------------------------------------------------------------------------- choosing


#: Points of each worker on a command's affinity ring, and how many distinct workers
#: after a key's point are looked at (the first eligible of them gets the request).
RING_POINTS = 32
RING_SUCCESSORS = 8


def ring_point(text: str, salt: str = "") -> int:
    """A position on an affinity ring: the first 48 bits of SHA-1 (Lua scripts have
    ``redis.sha1hex``, so the Redis registry's rings have the same points). ``salt`` is
    the broker's secret: without it a worker could choose an id that lands just after
    a key it wants."""
    return int(hashlib.sha1(f"{salt}{text}".encode()).hexdigest()[:12], 16)


def worker_points(worker_id: str, salt: str = "") -> list[int]:
    return [ring_point(f"{worker_id}#{i}", salt) for i in range(RING_POINTS)]


class Ring:
    """Consistent hashing for affinity keys: each worker at RING_POINTS points of a
    circle, a key at one; the key's workers are the next ones clockwise. Finding them
    costs O(log n), and when a worker leaves only the keys it held move."""

    def __init__(self, workers: Iterable[WorkerStats], salt: str = "") -> None:
        self.salt = salt
        points = sorted((p, w.worker_id, w) for w in workers
                        for p in worker_points(w.worker_id, salt))
        self._points = [p for p, _, _ in points]
        self._workers = [w for _, _, w in points]

    def add(self, w: WorkerStats) -> None:
        """Put a worker on the ring in place: O(n) for the list moves, no rebuild."""
        for point in worker_points(w.worker_id, self.salt):
            i = bisect.bisect_left(self._points, point)
            self._points.insert(i, point)
            self._workers.insert(i, w)

    def remove(self, w: WorkerStats) -> None:
        for point in worker_points(w.worker_id, self.salt):
            i = bisect.bisect_left(self._points, point)
            while i < len(self._points) and self._points[i] == point:
                if self._workers[i] is w:
                    del self._points[i], self._workers[i]
                    break
                i += 1

    def successors(self, key: str, count: int = RING_SUCCESSORS) -> list[WorkerStats]:
        """The first ``count`` distinct workers clockwise from the key's point."""
        found: dict[str, WorkerStats] = {}
        n = len(self._points)
        start = bisect.bisect_left(self._points, ring_point(key, self.salt))
        for i in range(n):
            w = self._workers[(start + i) % n]
            if w.worker_id not in found:
                found[w.worker_id] = w
                if len(found) == count:
                    break
        return list(found.values())


def rendezvous(key: str, worker_id: str, salt: str = "") -> int:
    """Highest-random-weight hashing, for a key among a selector's workers (which the
    ring of the whole command does not know): the highest value gets it."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{worker_id}".encode(), digest_size=8,
                                          key=salt.encode()[:64]).digest(), "big")


def by_affinity(workers: Iterable[WorkerStats], key: str, salt: str = ""
                ) -> list[WorkerStats]:
    """``workers`` in the order an affinity key prefers them (rendezvous)."""
    return sorted(workers, key=lambda w: rendezvous(key, w.worker_id, salt), reverse=True)


def explanation(strategy: str, seen: int, of: int, excluded: dict[str, int],
                chosen: WorkerStats | None = None, score: float = 0.0,
                runner_up: float | None = None) -> str:
    """What choosing saw, compactly, for the history row and ``manage.py explain``:
    ``least_loaded: 2 of 3; 1 draining; w2 1.05 vs 4.2``."""
    text = f"{strategy}: {seen - sum(excluded.values())} of {seen}"
    if of > seen:
        text += f" (sampled of {of})"
    if excluded:
        text += "; " + " ".join(f"{n} {why}" for why, n in sorted(excluded.items()))
    if chosen is not None:
        text += f"; {chosen.worker_id} {score:.3g}"
        if runner_up is not None:
            text += f" vs {runner_up:.3g}"
    return text


def choose(candidates: Iterable[WorkerStats], wanted: Wanted, strategy_name: str, seq: int,
           rng: random.Random, now: float, *, of: int | None = None,
           canaries: dict[str, tuple[str, float]] | None = None) -> Choice:
    """Choose a worker for ``wanted`` among ``candidates`` (the live workers that offer
    its command; ``of``: how many there are, when these are a sample). For an affinity
    key the candidates come in the key's order (:class:`Ring`, :func:`by_affinity`):
    the first eligible one gets it."""
    target, select, avoid = wanted.target, wanted.select, wanted.avoid
    excluded: dict[str, int] = {}
    eligible: list[WorkerStats] = []
    seen = matched = 0
    for w in candidates:  # the hot loop: a few attribute reads per worker
        seen += 1
        if target is not None and w.worker_id != target:
            continue
        if select and not matches(w, select):
            excluded["selector"] = excluded.get("selector", 0) + 1
            continue
        if avoid and w.worker_id in avoid:
            excluded["avoided"] = excluded.get("avoided", 0) + 1
            continue
        matched += 1
        state = unavailable(w, now)
        if state is not None:
            excluded[state] = excluded.get(state, 0) + 1
        else:
            eligible.append(w)
    of = max(of or 0, seen)
    if not matched:  # nobody offers it (but those it must avoid), or matches the selector
        unmatched = wanted.selector_text() if select and excluded.get("selector") else ""
        return Choice(None, False, explanation(strategy_name, seen, of, excluded), unmatched)
    if not eligible:
        return Choice(None, True, explanation(strategy_name, seen, of, excluded))
    pool = _canary_pool(eligible, wanted.command, canaries, rng) if canaries else eligible
    probe = next((w for w in pool if w.probing), None)
    if wanted.affinity is not None:  # the registry ordered them for the key
        chosen, name = pool[0], "affinity"
    elif probe is not None:  # its time out is up: its trial request, whatever its figures
        chosen, name = probe, "probe"
    else:
        chosen = get_strategy(strategy_name)(pool, seq, rng, now)
        name = strategy_name
    runner_up = min((load_score(w, now) for w in pool if w is not chosen), default=None)
    return Choice(chosen, True, explanation(name, seen, of, excluded, chosen,
                                            load_score(chosen, now), runner_up))


def _canary_pool(eligible: list[WorkerStats], command: str,
                 canaries: dict[str, tuple[str, float]], rng: random.Random
                 ) -> list[WorkerStats]:
    """For a command with a canary rule, the share of its traffic for that version
    goes to workers of it, the rest to the others (or all, if one side is empty)."""
    rule = canaries.get(command)
    if rule is None:
        return eligible
    version, share = rule
    canary = [w for w in eligible if w.version == version]
    stable = [w for w in eligible if w.version != version]
    pick = canary if rng.random() < share else stable
    return pick or eligible


def parse_canaries(text: str) -> dict[str, tuple[str, float]]:
    """``"resize=2.1:10,train=3.0:50"`` -> {command: (version, share 0-1)}."""
    rules = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        command, _, rest = part.partition("=")
        version, _, percent = rest.rpartition(":")
        try:
            share = float(percent) / 100
        except ValueError:
            raise ValueError(f"BROKER_CANARY: '{part}' is not command=version:percent") from None
        if not command or not version or not 0 <= share <= 1:
            raise ValueError(f"BROKER_CANARY: '{part}' is not command=version:percent")
        rules[command] = (version, share)
    return rules


class Health(enum.Enum):
    """What one finished request says about its worker (the value is release.lua's)."""

    OK = "1"  # answered; an error the handler raised on purpose counts as answered
    ERROR = "e"  # the handler failed unexpectedly: a worse score, never an ejection
    FAULT = "0"  # infrastructure: a lease ran out
    #: No verdict: the slot was not used, the request was cancelled, it ran out of the
    #: time its requester gave it, or its answer was too large (which a requester
    #: chooses, or chooses with the worker, so it must not be able to eject workers
    #: with it); its latency still counts.
    UNKNOWN = ""


def ejection_due(failures: int, probing: bool, health: Health, after: int,
                 out_until: float, now: float) -> bool:
    """After an outcome: is it time to take the worker out of rotation? Not while it is
    out already (the requests it held then fail too, and must not stretch its time)."""
    return health is Health.FAULT and out_until <= now and (failures >= after or probing)


def ejection_seconds(ejections: int, base: float, most: float) -> float:
    """How long the ``ejections``-th ejection lasts: doubling, up to ``most``."""
    return min(most, base * 2 ** max(0, ejections - 1))
