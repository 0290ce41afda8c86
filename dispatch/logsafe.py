"""Log lines that a peer cannot forge or flood.

Peer-supplied text (worker names, command names, notification bodies, error texts
that quote a frame) goes through :func:`workers.protocol.quote` before it reaches
a log line: control characters escaped, cut to a few hundred characters. And one
connection gets a :class:`LogBudget`, so a peer that keeps sending refused frames
costs a few lines, then one line per interval saying how many were left out.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from workers.protocol import quote

__all__ = ["LogBudget", "RedactTokens", "quote"]

#: Lines one connection may log at once, and one more every REFILL_SECONDS.
BURST = 5
REFILL_SECONDS = 10.0


class LogBudget:
    """A token bucket of log lines: for one connection, or for a kind of line."""

    __slots__ = ("_burst", "_refill", "_tokens", "_stamp", "_suppressed")

    def __init__(self, burst: int = BURST, refill_seconds: float = REFILL_SECONDS) -> None:
        self._burst = float(burst)
        self._refill = refill_seconds
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._suppressed = 0

    def log(self, logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
        """``logger.log(level, msg, *args)``, unless this connection has used its budget."""
        if not logger.isEnabledFor(level):
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._refill)
        self._stamp = now
        if self._tokens < 1:
            self._suppressed += 1
            return
        self._tokens -= 1
        if self._suppressed:
            msg += " (%d similar line(s) left out)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        logger.log(level, msg, *args)


class RedactTokens(logging.Filter):
    """Hide ``token=...`` in log lines: servers log request paths with their query string.

    uvicorn does (``"WebSocket /ws/requester/?token=..." [accepted]``); the
    README's uvicorn recipe installs this filter with ``--log-config``, and the
    broker's own logging has it too.
    """

    _pattern = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message.lower():
            record.msg, record.args = self._pattern.sub(r"\1[redacted]", message), ()
        return True
