"""Answers this process passed to other processes, kept a while.

A worker's answer goes to the process that holds its request. If that process died
(kill -9) before it read the answer, the answer must not die with it: the process
that takes its requests over (after two liveness rounds) asks the worker's process to
adopt each that was running (:class:`~.events.Adopt`), and one that finished
meanwhile is answered from here. No I/O; bounded in time and in bytes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import orjson

from .events import Reply

#: Seconds an answer is kept at least (the process keeps it longer than a takeover
#: takes: :func:`~.liveness.takeover_seconds`).
KEEP_SECONDS = 60.0
#: Bytes of answers kept at most (the oldest go first).
KEEP_BYTES = 32 * 1024 * 1024


class SentReplies:
    """Answers sent to other processes' inboxes in the last KEEP_SECONDS, by key."""

    def __init__(self, seconds: float = KEEP_SECONDS, max_bytes: int = KEEP_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        #: key -> (when, the answer, its size in bytes, roughly)
        self._kept: OrderedDict[str, tuple[float, Reply, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, reply: Reply) -> None:
        size = 200 + (len(reply.data) if isinstance(reply.data, str) else
                      len(orjson.dumps(reply.data)) if isinstance(reply.data, (dict, list))
                      else 0) + len(reply.error or "")
        now = self.clock()
        self._forget(reply.key)
        self._kept[reply.key] = (now, reply, size)
        self.bytes += size
        while self._kept:
            at, _, oldest = next(iter(self._kept.values()))
            if now - at <= self.seconds and self.bytes <= self.max_bytes:
                break
            self._kept.popitem(last=False)
            self.bytes -= oldest

    def take(self, key: str) -> Reply | None:
        """The answer sent for ``key``, if it is kept; taken."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        self._forget(key)
        return kept[1]

    def _forget(self, key: str) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self.bytes -= kept[2]
