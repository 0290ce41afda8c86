"""Final answers kept for a while, so that a requester whose connection dropped can
come back for what it asked for (``{"attach": ...}``, ``GET /api/requests/<id>``).

Kept ``RESULT_TTL`` seconds after the request finished, under the credential that
sent it: another credential cannot see it. In memory on the embedded default
(bounded in bytes, oldest first out); in Redis in a cluster, written in batches
(one pipeline per batch, whatever its size), so that any process can find it; and
read in batches too (one MGET for the lookups of a moment: every request sent asks
whether its id was answered lately).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import redis.exceptions

from .. import conf
from ..redis.connection import CLIENT_OPTIONS, Clients, RedisTarget
from ..registry import Registry, RegistryUnavailable
from ..registry.redis import RedisRegistry
from ..loops import Batcher

log = logging.getLogger("dispatch.results")


class MemoryResults:
    """The answers of one process."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._bytes = 0

    def put(self, owner: str, request_id: str, text: str) -> None:
        ttl = conf.get("RESULT_TTL")
        if not ttl:
            return
        key = (owner, request_id)
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old[1])
        self._items[key] = (time.monotonic() + ttl, text)
        self._bytes += len(text)
        self._trim()

    def _trim(self) -> None:
        now, limit = time.monotonic(), conf.get("RESULT_STORE_BYTES")
        while self._items:
            key, (until, text) = next(iter(self._items.items()))
            if until > now and self._bytes <= limit:
                return
            del self._items[key]
            self._bytes -= len(text)

    async def get(self, owner: str, request_id: str) -> str | None:
        self._trim()
        found = self._items.get((owner, request_id))
        return found[1] if found is not None else None


class RedisResults:
    """The answers of a cluster, in the registry's Redis."""

    def __init__(self, target: RedisTarget, prefix: str) -> None:
        self._clients = Clients(target, **CLIENT_OPTIONS)
        self._prefix = prefix
        self._writes: Batcher[tuple[str, str]] = Batcher(self._write, "dispatch-results")
        self._reads: Batcher[tuple[str, asyncio.Future[str | None]]] = Batcher(
            self._read, "dispatch-results-read")
        #: This process's own answers too: one attached to right after it was answered,
        #: while its Redis write is still on its way, is found here.
        self._local = MemoryResults()

    def _key(self, owner: str, request_id: str) -> str:
        return f"{self._prefix}:result:{owner}|{request_id}"

    def put(self, owner: str, request_id: str, text: str) -> None:
        if conf.get("RESULT_TTL") and len(text) <= conf.get("RESULT_STORE_BYTES"):
            self._writes.add((self._key(owner, request_id), text))
            self._local.put(owner, request_id, text)

    async def _write(self, items: list[tuple[str, str]]) -> None:
        ttl_ms = int(conf.get("RESULT_TTL") * 1000)
        try:
            async with self._clients.get().pipeline(transaction=False) as pipe:
                for key, text in items:
                    pipe.set(key, text, px=ttl_ms)
                await pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                OSError) as exc:
            log.warning("could not keep %d answer(s) for re-attach: %s", len(items), exc)

    async def get(self, owner: str, request_id: str) -> str | None:
        local = await self._local.get(owner, request_id)
        if local is not None:
            return local
        found: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reads.add((self._key(owner, request_id), found))
        return await found

    async def _read(self, items: list[tuple[str, asyncio.Future[str | None]]]) -> None:
        try:
            texts = await self._clients.get().mget([key for key, _ in items])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                OSError) as exc:
            texts = [RegistryUnavailable(f"Redis unavailable: {exc}")] * len(items)
        except BaseException as exc:  # cancelled, or a defect: each asker hears of it
            for _, found in items:
                if not found.done():
                    if isinstance(exc, asyncio.CancelledError):
                        found.cancel()
                    else:
                        found.set_exception(exc)
            raise
        for (_, found), text in zip(items, texts):
            if found.done():  # its asker was cancelled
                continue
            if isinstance(text, BaseException):
                found.set_exception(text)
            else:
                found.set_result(text)


Results = MemoryResults | RedisResults


def results_for(registry: Registry) -> Results:
    """Where the answers of a dispatcher with this registry are kept."""
    if isinstance(registry, RedisRegistry):
        return RedisResults(registry.target, registry.prefix)
    return MemoryResults()
