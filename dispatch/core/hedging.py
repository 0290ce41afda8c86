"""When to send a slow request's second copy, and how many copies may go.

A hedged request (Dean and Barroso, "The Tail at Scale") is sent to a second worker
when the first has not answered within the command's recent 95th percentile; the
first answer wins and the other copy is cancelled. Only for commands whose workers
said they may run twice (or requests that ask for it), never for streams. The
delay costs nothing when answers are fast; the budget (a token bucket filled by
``HEDGE_MAX_SHARE`` of a token per hedgeable request) keeps hedges from doubling
the load when everything is slow. Pure bookkeeping: the request table asks it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

#: Latencies kept per command, and how many are needed before hedging at all.
WINDOW = 200
MIN_SAMPLES = 20
#: The p95 is computed again after this many new samples (sorting 200 costs ~10 us).
RECOMPUTE_EVERY = 20
#: Hedges that may go at once above the steady share (the bucket's size).
BURST = 10.0
#: Commands tracked at most (the least recently used are forgotten beyond it).
MAX_COMMANDS = 1024


class _Window:
    __slots__ = ("samples", "fresh", "p95")

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self.fresh = 0
        self.p95: float | None = None


class HedgePolicy:
    """Per-command p95 of answered requests, and the hedge budget."""

    def __init__(self) -> None:
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.tokens = BURST

    def record(self, command: str, latency_ms: float) -> None:
        """One answered (unhedged) request of a hedgeable command took this long."""
        window = self._windows.get(command)
        if window is None:
            window = self._windows[command] = _Window()
            if len(self._windows) > MAX_COMMANDS:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(command)
        window.samples.append(latency_ms)
        window.fresh += 1
        if window.fresh >= RECOMPUTE_EVERY or window.p95 is None and \
                len(window.samples) >= MIN_SAMPLES:
            ordered = sorted(window.samples)
            window.p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            window.fresh = 0

    def delay(self, command: str, share: float) -> float | None:
        """Seconds after which a request of ``command`` just placed is hedged (None: not
        now: too few samples, or no budget to spend). Each call deposits ``share`` of a
        token, so hedges stay at most that share of hedgeable requests, plus a burst."""
        self.tokens = min(BURST, self.tokens + share)
        window = self._windows.get(command)
        if window is None or window.p95 is None or self.tokens < 1:
            return None
        return window.p95 / 1000

    def spend(self) -> bool:
        """Take a token for one hedge; False when the budget is spent (the others hedged
        meanwhile)."""
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
