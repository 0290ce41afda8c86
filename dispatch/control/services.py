"""Broker operations the control API (and so the management commands) offer.

They act through this process's dispatcher and the shared registry and layer,
so they reach every worker whichever broker process holds it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson

from workers.protocol import ApiResponse, new_id

from ..balancing import Wanted, decayed, load_score, matches, selector, unavailable
from ..core.dispatcher import get_dispatcher
from ..core.events import Notify
from ..core.metering import meter
from ..registry import WorkerEntry, get_registry


async def workers_list() -> list[dict[str, Any]]:
    """Every online worker with its load, busiest first; its latency as the balancer
    sees it now (decayed while it is idle), as the dashboard and explain show it."""
    entries = await get_registry().all()
    entries.sort(key=lambda w: (-w.in_flight, w.worker_id))
    now = time.time()
    return [{**w.to_dict(), "latency_ms": round(decayed(w.latency_ms, w.latency_at, now), 3)}
            for w in entries]


async def describe(command: str | None = None) -> dict[str, Any]:
    """Every command the online workers offer (or only ``command``), sorted: by which
    workers, its schema as most of them sent it at registration (``schemas_differ``
    when others sent another; None when none sent one), and its ``stats``.

    Reading a big fleet's schemas is CPU work (up to 16 KB of JSON per worker): it
    is done in a thread, so the event loop keeps serving meanwhile."""
    entries = await get_registry().described()
    return await asyncio.to_thread(_describe, entries, command, command_stats())


def _describe(entries: list[WorkerEntry], command: str | None,
              stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    offering: dict[str, list[WorkerEntry]] = {}
    for entry in entries:
        for name in entry.commands:
            if command is None or name == command:
                offering.setdefault(name, []).append(entry)
    parsed: dict[str, dict[str, tuple[bytes, dict[str, Any]]]] = {}  # each text once
    return {"commands": [_command(name, offering[name], stats.get(name, {}), parsed)
                         for name in sorted(offering)]}


def command_stats() -> dict[str, dict[str, Any]]:
    """This process's statistics of each command since it started (answered, failed,
    p50 and p99 latency in ms): :func:`describe` shows a command's as its ``stats``."""
    return meter.command_summary()


def _command(name: str, entries: list[WorkerEntry], stats: dict[str, Any],
             parsed: dict[str, dict[str, tuple[bytes, dict[str, Any]]]]) -> dict[str, Any]:
    entries.sort(key=lambda e: (e.name, e.worker_id))
    votes: Counter[bytes] = Counter()
    schemas: dict[bytes, dict[str, Any]] = {}
    for entry in entries:
        mine = parsed.get(entry.schemas)
        if mine is None:
            mine = parsed[entry.schemas] = _schemas(entry.schemas)
        found = mine.get(name)
        if found is not None:
            votes[found[0]] += 1
            schemas[found[0]] = found[1]
    # Most workers' schema; between as many, the same one every time.
    chosen = max(votes, key=lambda key: (votes[key], key), default=None)
    return {"command": name,
            "workers": [{"worker_id": e.worker_id, "name": e.name} for e in entries],
            "count": len(entries), "schema": schemas.get(chosen) if chosen else None,
            "schemas_differ": len(votes) > 1, "stats": stats}


def _schemas(text: str) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """A worker's schemas by command, each with a key that equal schemas share."""
    if not text:
        return {}
    return {command: (orjson.dumps(schema, option=orjson.OPT_SORT_KEYS), schema)
            for command, schema in orjson.loads(text).items()}


async def broadcast(message: Any) -> int:
    """Send a notification to every worker; returns how many were online."""
    await (await get_dispatcher()).exchange.broadcast(Notify(message, {}))
    return await get_registry().count()


async def drain(worker_id: str, draining: bool = True) -> bool:
    """Take a worker out of rotation (or back); False if no such worker is online."""
    return await get_registry().set_draining(worker_id, draining)


class Reply:
    """The sink of a request made in-process (the control API, dispatch.fleet): a future
    for its one answer; chunks it does not want are acknowledged at once."""

    def __init__(self) -> None:
        self.future: asyncio.Future[ApiResponse] = asyncio.get_running_loop().create_future()

    async def answer(self, response: ApiResponse, text: str) -> None:
        if not self.future.done():
            self.future.set_result(response)

    async def event(self, request_id: str, text: str, *, ack: Any = None,
                    mergeable: bool = False) -> None:
        if ack is not None:
            await ack()


async def request(command: str, data: dict[str, Any], *, timeout: float | None = None,
                  worker_id: str | None = None, requester: str = "api",
                  select: dict[str, str] | None = None, affinity: str | None = None,
                  traceparent: str | None = None) -> ApiResponse:
    """Run one command on the best worker (or on ``worker_id``) and wait for its answer."""
    dispatcher = await get_dispatcher()
    reply = Reply()
    await dispatcher.submit(command, data, reply, request_id=new_id(), requester=requester,
                            timeout=timeout, worker_id=worker_id, owner="operator",
                            select=selector(select), affinity=affinity,
                            traceparent=traceparent or "")
    return await reply.future


async def explain(command: str, *, select: dict[str, str] | None = None,
                  affinity: str | None = None, worker_id: str | None = None
                  ) -> dict[str, Any]:
    """How a request would be routed now (a dry run: no slot is taken), and how each
    worker offering the command looks to the balancer."""
    wanted = Wanted(command, worker_id, selector(select), affinity)
    reservation, entries = await get_registry().explain(wanted)
    now = time.time()
    chosen = reservation.worker.worker_id if reservation.worker is not None else None
    rows = []
    for w in entries:
        rows.append({"worker_id": w.worker_id, "name": w.name,
                     "state": unavailable(w, now) or "eligible"
                     if matches(w, wanted.select) else "selector",
                     "in_flight": w.in_flight, "max_concurrency": w.max_concurrency,
                     "weight": w.weight, "latency_ms": round(decayed(
                         w.latency_ms, w.latency_at, now), 3),
                     "error_rate": round(w.error_rate, 4),
                     "score": round(load_score(w, now), 4), "labels": w.labels,
                     "version": w.version, "chosen": w.worker_id == chosen})
    rows.sort(key=lambda row: (row["state"] != "eligible", row["score"]))
    return {"command": command, "worker_id": chosen, "capable": reservation.capable,
            "routing": reservation.why, "unmatched": reservation.unmatched or None,
            "candidates": rows}


async def cancel(request_id: str, by: str) -> int:
    """Cancel every running request with this id, whoever sent it; how many were found.
    ``by`` (the operator, and where they asked) goes in its answer and its history."""
    dispatcher = await get_dispatcher()
    return await dispatcher.lookup.cancel(None, request_id, f"cancelled by {by}")


async def status(owner: str, request_id: str) -> str | None:
    """A request of ``owner``: "running", its kept answer (JSON), or None if unknown."""
    return await (await get_dispatcher()).lookup.status(owner, request_id)
