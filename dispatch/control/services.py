"""Broker operations the control API (and so the management commands) offer.

They act through this process's dispatcher and the shared registry and layer,
so they reach every worker whichever broker process holds it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from channels.layers import get_channel_layer

from workers.protocol import ApiResponse, new_id

from ..core import events
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


async def request(command: str, data: dict[str, Any], *, timeout: float | None = None,
                  worker_id: str | None = None, requester: str = "api") -> ApiResponse:
    """Run one command on the best worker (or on ``worker_id``) and wait for its answer."""
    dispatcher = await get_dispatcher()
    answered: asyncio.Future[ApiResponse] = asyncio.get_running_loop().create_future()

    async def respond(response: ApiResponse) -> None:
        if not answered.done():
            answered.set_result(response)

    await dispatcher.submit(command, data, respond, request_id=new_id(), requester=requester,
                            timeout=timeout, worker_id=worker_id)
    return await answered
