"""The sending side of one worker connection: a frame goes at once or, with batches
granted and requests still running, waits for the end of this turn of the loop and
goes with the others in one batch frame.

Apart from :class:`~workers.session.Session` because everything a session sends
(answers, pings, errors, the jobs' progress and chunks) goes through here, and only
here is it decided how frames are put on the socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .errors import describe
from .protocol import BATCH_BYTES, batch_frames

logger = logging.getLogger("workers.client")

#: How a session starts a task that the worker keeps track of (:meth:`Session.spawn`).
Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]


class Outbox:
    """Frames to the broker, sent one by one or gathered into batch frames."""

    def __init__(self, ws: ClientConnection, spawn: Spawn,
                 gathering: Callable[[], bool]) -> None:
        self.ws = ws
        self._spawn = spawn
        #: Whether a frame should wait for others now (batches granted, requests running).
        self._gathering = gathering
        #: Frames to send in one batch frame once this turn of the loop ends.
        self.gathered: list[str] = []
        self.batch_limit = BATCH_BYTES

    async def send(self, text: str) -> bool:
        """Send one frame; False (and a log line) if the connection is gone.

        With batches granted and other requests still running, the frame waits for the
        end of this turn of the loop and goes with the others' answers in one frame
        (True then means: queued). Alone, it goes at once: no latency added.
        """
        if self.gathered:
            self.gathered.append(text)
            return True
        if self._gathering():
            self.gathered.append(text)
            self._spawn(self._send_gathered())
            return True
        return await self._send_now(text)

    async def _send_gathered(self) -> None:
        await asyncio.sleep(0)  # let the other answers of this turn join
        texts, self.gathered = self.gathered, []
        for frame in batch_frames(texts, self.batch_limit):
            if not await self._send_now(frame):
                return

    async def _send_now(self, text: str) -> bool:
        try:
            await self.ws.send(text)
        except ConnectionClosed as exc:
            logger.warning("Frame not sent, connection closed: %s", describe(exc))
            return False
        return True
