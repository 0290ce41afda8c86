"""Broker operations the control API (and so the management commands) offer.

They act through this process's dispatcher and the shared registry and layer,
so they reach every worker whichever broker process holds it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.layers import get_channel_layer

from workers.protocol import ApiResponse, new_id

from ..core import events
from ..core.balancing import (Wanted, decayed, eligible_state, load_score, matches,
                              selector)
from ..core.dispatcher import get_dispatcher
from ..registry import get_registry


async def workers_list() -> list[dict[str, Any]]:
    """Every online worker with its load, busiest first."""
    entries = await get_registry().all()
    entries.sort(key=lambda w: (-w.in_flight, w.worker_id))
    return [w.to_dict() for w in entries]


async def broadcast(message: Any) -> int:
    """Send a notification to every worker; returns how many were online."""
    await get_channel_layer().group_send(events.INBOXES_GROUP, events.notify(message))
    return await get_registry().count()


async def drain(worker_id: str, draining: bool = True) -> bool:
    """Take a worker out of rotation (or back); False if no such worker is online."""
    return await get_registry().set_draining(worker_id, draining)


class _Reply:
    """The control API's sink: a future for the one answer."""

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
                  select: dict[str, str] | None = None, affinity: str | None = None
                  ) -> ApiResponse:
    """Run one command on the best worker (or on ``worker_id``) and wait for its answer."""
    dispatcher = await get_dispatcher()
    reply = _Reply()
    await dispatcher.submit(command, data, reply, request_id=new_id(), requester=requester,
                            timeout=timeout, worker_id=worker_id, owner="operator",
                            select=selector(select), affinity=affinity)
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
                     "state": eligible_state(w, now) or "eligible"
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


async def cancel(request_id: str) -> int:
    """Cancel every running request with this id, whoever sent it; how many were found."""
    dispatcher = await get_dispatcher()
    return await dispatcher.cancel(None, request_id, "cancelled by an operator")


async def status(owner: str, request_id: str) -> str | None:
    """A request of ``owner``: "running", its kept answer (JSON), or None if unknown."""
    return await (await get_dispatcher()).status(owner, request_id)
