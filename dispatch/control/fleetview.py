"""What the live dashboard shows, and the one loop per process that pushes it.

Once a second, while anyone watches, a snapshot is built (one registry read, a
look at this process's request table and meter) and the same text goes to every
dashboard socket of the process, so ten open dashboards cost one snapshot.

The fleet comes from the registry, so with Redis every process's workers are
shown; throughput, latency, commands, the queue and failures are this process's.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any, Awaitable, Callable, Iterable

import orjson

from ..balancing import WorkerState, decayed
from ..core.dispatcher import Dispatcher, get_dispatcher
from ..loops import PerLoop
from ..core.metering import Failure, meter
from ..registry import get_registry

log = logging.getLogger("dispatch.dashboard")

PUSH_SECONDS = 1.0
#: Most rows of each list a snapshot carries (a fleet of thousands is counted, and
#: its busiest and its troubled shown).
MAX_WORKERS = 500
MAX_RUNNING = 50
MAX_FAILURES = 20  # kinds of failure (alike ones are one row, counted)
CHART_SECONDS = 300

Send = Callable[[str], Awaitable[None]]


def _worker_row(w: Any, now: float) -> dict[str, Any]:
    return {"worker_id": w.worker_id, "name": w.name, "labels": w.labels,
            "version": w.version, "state": w.state, "in_flight": w.in_flight,
            "max_concurrency": w.max_concurrency, "weight": w.weight,
            "completed": w.completed, "errors": w.errors,
            "latency_ms": round(decayed(w.latency_ms, w.latency_at, now), 2),
            "error_rate": round(w.error_rate, 3),
            "seen_ago": round(max(0.0, now - w.last_heartbeat), 1),
            "process": w.process, "address": w.address,
            "ejected_until": w.ejected_until or None, "ejected_why": w.ejected_why or None}


def _trouble_first(w: Any) -> tuple[int, float, str]:
    """Ejected and draining workers first, then the busiest."""
    return (0 if w.state in (WorkerState.EJECTED, WorkerState.PROBING) else 1 if w.draining else 2,
            -w.in_flight / max(1, w.max_concurrency), w.name or w.worker_id)


def _running_row(r: Any, loop_now: float) -> dict[str, Any]:
    fraction, message = r.reported or (None, None)
    return {"request_id": r.request_id, "command": r.command, "state": r.state.value,
            "age": round(loop_now - r.opened, 1),
            "workers": [p.worker_id for p in r.placements], "requester": r.requester,
            "progress": fraction, "message": (message or "")[:120] or None}


def failure_groups(failures: Iterable[Failure], now: float) -> list[dict[str, Any]]:
    """The recent failures, newest first, alike ones (command, code and text) as one
    row with their count: a burst of one fault reads as one line, not dozens."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for f in reversed(list(failures)):
        group = groups.get((f.command, f.code, f.error))
        if group is None:
            if len(groups) == MAX_FAILURES:
                continue
            group = groups[(f.command, f.code, f.error)] = {
                "command": f.command, "code": f.code, "error": f.error, "count": 0,
                "ago": round(max(0.0, now - f.at), 1), "request_id": f.request_id,
                "workers": []}
        group["count"] += 1
        if f.worker_id and f.worker_id not in group["workers"] and len(group["workers"]) < 3:
            group["workers"].append(f.worker_id)
    return list(groups.values())


async def snapshot(dispatcher: Dispatcher) -> dict[str, Any]:
    """Everything the page draws, as plain JSON data."""
    now = time.time()
    try:
        entries = await get_registry().all()
        registry_error = None
    except Exception as exc:  # noqa: BLE001 - the page says so and keeps the rest
        entries, registry_error = [], str(exc)[:200]
    entries.sort(key=_trouble_first)
    offered: dict[str, int] = {}
    states: dict[str, int] = {}
    for w in entries:
        states[w.state.value] = states.get(w.state.value, 0) + 1
        for command in w.commands:
            offered[command] = offered.get(command, 0) + 1
    summary = meter.command_summary()
    commands = sorted(({"command": name, "workers": offered.get(name, 0),
                        **summary.get(name, {})} for name in set(offered) | set(summary)),
                      key=lambda c: (-c.get("answered", 0), c["command"]))
    loop_now = asyncio.get_running_loop().time()
    table = dispatcher.table
    oldest = table.waiting.oldest()
    running = heapq.nsmallest(MAX_RUNNING, table.requests.values(), key=lambda r: r.opened)
    return {
        "type": "snapshot", "at": now, "process": dispatcher.process,
        "registry_error": registry_error,
        "workers": [_worker_row(w, now) for w in entries[:MAX_WORKERS]],
        "workers_total": len(entries), "states": states,
        "slots": {"in_flight": sum(w.in_flight for w in entries),
                  "capacity": sum(w.max_concurrency for w in entries)},
        "series": meter.window(CHART_SECONDS),
        "commands": commands,
        "queue": {"pending": dispatcher.pending, "waiting": dispatcher.waiting,
                  "oldest_wait": round(loop_now - oldest, 1) if oldest is not None else None},
        "running": [_running_row(r, loop_now) for r in running],
        "failures": failure_groups(meter.failures, now),
    }


class Feed:
    """Pushes a snapshot to every subscriber once a second while there are any."""

    def __init__(self) -> None:
        self.subscribers: set[Send] = set()
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, send: Send) -> None:
        self.subscribers.add(send)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="dashboard-feed")

    def unsubscribe(self, send: Send) -> None:
        self.subscribers.discard(send)

    async def start(self) -> None:
        """Nothing to start: the push loop runs while someone subscribes."""

    async def stop(self) -> None:
        self.subscribers.clear()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        dispatcher = await get_dispatcher()
        while self.subscribers:
            try:
                text = orjson.dumps(await snapshot(dispatcher)).decode()
            except Exception:  # noqa: BLE001 - never let one bad snapshot end the feed
                log.exception("could not build the dashboard snapshot")
            else:
                for send in list(self.subscribers):
                    try:
                        await send(text)
                    except Exception:  # noqa: BLE001 - that socket is gone
                        self.subscribers.discard(send)
            await asyncio.sleep(PUSH_SECONDS)


_feeds: PerLoop[Feed] = PerLoop(Feed)
#: This event loop's feed (one per process in production; tests run several loops).
get_feed = _feeds.get
