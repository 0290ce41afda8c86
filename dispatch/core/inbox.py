"""Receiving from the channel layer in a way that outlives an outage of its backend.

Channels lets an exception from ``channel_layer.receive`` end the consumer, which
would close every worker socket the moment Redis restarts. Here a failed receive is
retried with a growing pause instead; the outage is logged once when it starts and
once when it ends, for the whole process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from channels.layers import BaseChannelLayer
from redis.exceptions import RedisError

log = logging.getLogger("dispatch.inbox")

MAX_PAUSE = 2.0
#: What a layer raises while its backend cannot be reached (Redis down, or failing
#: over): socket errors and timeouts, and redis-py's own.
OUTAGE = (OSError, RedisError)

_down = False


async def receive(layer: BaseChannelLayer, channel: str) -> dict[str, Any]:
    """The next message on ``channel``, waiting out layer outages."""
    global _down
    pause = 0.0
    while True:
        try:
            message = await layer.receive(channel)
        except OUTAGE as exc:
            if not _down:
                _down = True
                log.error("channel layer unavailable; retrying: %s", exc)
            pause = min(MAX_PAUSE, pause * 2 or 0.05)
            await asyncio.sleep(pause)
            continue
        if _down:
            _down = False
            log.warning("channel layer reachable again")
        return message


async def listen(layer: BaseChannelLayer, channel: str,
                 handle: Callable[[dict[str, Any]], Awaitable[None]], who: str,
                 wanted: Callable[[], bool]) -> None:
    """Hand every message on ``channel`` to ``handle`` while ``wanted()`` says so.

    A message whose handling fails is logged and dropped: one bad message must not
    deafen the listener. ``wanted`` is checked as well as cancelling the task because
    a cancellation delivered inside redis-py's blocking read is now and then lost
    (seen with channels-redis): the receive then carries on, and without the check
    such a listener would outlive its owner.
    """
    while wanted():
        try:
            message = await receive(layer, channel)
        except Exception:  # not an outage we know of: said loudly, and the listener lives
            log.exception("%s: the channel layer's receive failed", who)
            await asyncio.sleep(MAX_PAUSE)
            continue
        if not wanted():
            return
        try:
            await handle(message)
        except Exception:
            log.exception("%s failed to handle a %r message", who, message.get("type"))
