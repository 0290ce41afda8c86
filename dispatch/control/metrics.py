"""``/metrics``: this process's counts in Prometheus' text format.

Built per scrape from :mod:`dispatch.core.metering` (plain counters the hot path
bumps) and a look at the dispatcher, the registry and the history buffer, with
``prometheus_client``'s metric families and its text encoder. Every broker process
answers for itself (with ``--processes N``, scrape each one's port); the counters
start at zero when a process starts, as Prometheus expects of counters.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily, Metric)
from prometheus_client.process_collector import ProcessCollector

from ..balancing import WorkerState
from ..core.dispatcher import Dispatcher
from ..core.metering import Meter, meter
from ..registry import get_registry

#: A worker's states, each a gauge (full is a moment's reason to pass one over, not a state).
WORKER_STATES = [s for s in WorkerState if s is not WorkerState.FULL]
#: The table's and dispatcher's own counts, exported as broker_events_total{event}.
EVENT_HELP = "Rare things the broker noticed (late or duplicate answers, full channels, ...)"


class _Snapshot:
    """What one scrape reports: read with awaits first, then encoded without any."""

    def __init__(self, dispatcher: Dispatcher, workers: Counter[str], meter: Meter,
                 registry_error: str | None) -> None:
        self.dispatcher = dispatcher
        self.workers = workers
        self.meter = meter
        self.registry_error = registry_error

    def collect(self) -> Iterator[Metric]:
        d, m = self.dispatcher, self.meter
        info = InfoMetricFamily("broker", "This broker process")
        info.add_metric([], {"process": d.process})
        yield info
        requests = CounterMetricFamily("broker_requests", "Requests answered, by command "
                                       "and outcome (ok, or the error code)",
                                       labels=["command", "outcome"])
        latency = HistogramMetricFamily("broker_request_duration_seconds",
                                        "From arrival to answer, by command",
                                        labels=["command"])
        timeouts = 0
        for command, cm in list(m.commands.items()):
            for outcome, n in cm.outcomes.items():
                requests.add_metric([command, outcome], n)
            timeouts += cm.outcomes.get("timeout", 0)
            latency.add_metric([command], [(_le(bound), n) for bound, n
                                           in cm.latency.cumulative()], cm.latency.sum / 1000)
        yield requests
        yield latency
        for name, value, text in (
                ("broker_retries", m.events["retries"], "Requests sent again to another "
                 "worker (a hedge not counted)"),
                ("broker_failovers", m.events["failovers"], "Workers lost (or hung) under "
                 "a request"),
                ("broker_hedges", m.events["hedges"], "Requests hedged: a second copy sent"),
                ("broker_timeouts", timeouts, "Requests answered 'timeout'"),
                ("broker_layer_errors", d.stats["layer_errors"], "Channel layer sends "
                 "that failed (the backend down)"),
                ("broker_registry_errors", d.stats["registry_errors"], "Registry calls "
                 "that failed (Redis down)"),
                ("broker_history_dropped", d.recorder.dropped, "History records dropped: "
                 "the buffer was full while the database was slow or down")):
            yield CounterMetricFamily(name, text, value=value)
        events = CounterMetricFamily("broker_events", EVENT_HELP, labels=["event"])
        for event, n in sorted(d.stats.items()):
            if event not in ("layer_errors", "registry_errors"):
                events.add_metric([event], n)
        yield events
        yield _by_socket("broker_connections_closed", "Connections the broker refused or "
                         "closed, by socket and reason (close code)", m.closed)
        yield _by_socket("broker_frames_refused", "Frames refused with an error (the "
                         "connection kept), by socket and code", m.refused_frames)
        oldest = d.table.waiting.oldest()
        loop_now = asyncio.get_running_loop().time()
        for name, value, text in (
                ("broker_requests_pending", d.pending, "Requests of this process not yet "
                 "answered (waiting or with a worker)"),
                ("broker_requests_waiting", d.waiting, "Requests waiting for a free worker"),
                ("broker_oldest_wait_seconds", 0 if oldest is None else loop_now - oldest,
                 "How long the longest-waiting request has waited"),
                ("broker_history_buffered", d.recorder.pending, "History records not "
                 "yet written"),
                ("broker_registry_up", 0 if self.registry_error else 1, "1 when this "
                 "scrape could read the registry")):
            yield GaugeMetricFamily(name, text, value=value)
        workers = GaugeMetricFamily("broker_workers", "Workers connected to this process, "
                                    "by routing state", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], self.workers.get(state, 0))
        yield workers


def _by_socket(name: str, text: str, counts: Counter[tuple[str, str]]) -> Metric:
    family = CounterMetricFamily(name, text, labels=["socket", "reason"])
    for (kind, reason), n in sorted(counts.items()):
        family.add_metric([kind, reason], n)
    return family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound / 1000)


async def exposition(dispatcher: Dispatcher) -> bytes:
    """The text of one scrape."""
    states: Counter[str] = Counter()
    error = None
    try:
        for w in await get_registry().all():
            if w.process == dispatcher.process:
                states[w.state] += 1
    except Exception as exc:  # noqa: BLE001 - a scrape must say so, not fail
        error = str(exc)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(dispatcher, states, meter, error))  # type: ignore[arg-type]
    registry.register(ProcessCollector(registry=None))
    return generate_latest(registry)



