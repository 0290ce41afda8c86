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

__all__ = ["LogBudget", "RedactTokens", "Throttle", "quote"]

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

    def allow(self) -> int | None:
        """None if this line must be left out; else how many were left out before it."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) / self._refill)
        self._stamp = now
        if self._tokens < 1:
            self._suppressed += 1
            return None
        self._tokens -= 1
        left_out, self._suppressed = self._suppressed, 0
        return left_out

    def log(self, logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
        """``logger.log(level, msg, *args)``, unless the budget is spent."""
        if not logger.isEnabledFor(level):
            return
        left_out = self.allow()
        if left_out is None:
            return
        if left_out:
            msg += " (%d similar line(s) left out)"
            args = (*args, left_out)
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


class Throttle(logging.Filter):
    """For loggers any peer can drive (Django's ``django.security``, ``django.request``):
    a few lines a second, each cut to a few hundred characters, without a traceback.

    A request with a Host header we do not serve makes Django log a whole traceback
    that repeats the header: one connection could fill the disk that way.
    """

    def __init__(self, burst: int = 10, refill_seconds: float = 1.0) -> None:
        super().__init__()
        self._budget = LogBudget(burst, refill_seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        left_out = self._budget.allow()
        if left_out is None:
            return False
        text = quote(record.getMessage(), 300)
        if left_out:
            text += f" ({left_out} similar line(s) left out)"
        record.msg, record.args = text, ()
        record.exc_info = record.exc_text = record.stack_info = None
        return True
