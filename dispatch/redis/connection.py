"""How the broker reaches Redis: one URL, or a master found through Sentinel.

Production Redis runs with replicas and Sentinel; the channel layer and the
worker registry must both follow a failover by themselves. Set either

* ``REDIS_URL=redis://host:6379/0``, or
* ``REDIS_SENTINELS=host:port,host:port,...`` with ``REDIS_SENTINEL_MASTER``
  (default ``mymaster``), and optionally ``REDIS_PASSWORD`` (the master's),
  ``REDIS_SENTINEL_PASSWORD`` and ``REDIS_DB``.

redis-py has no URL form for Sentinel, hence the separate variables. With
Sentinel every new connection asks the sentinels where the master is now, and a
demoted master's ``READONLY`` answer becomes a ``ConnectionError`` that makes it
ask again; the broker treats both like any Redis outage (errors, then recovery).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..conf import BadSetting

#: Seconds to wait for a TCP connection, and for an answer, before Redis counts as down.
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0

#: Options of every client. No retries: a refused connection fails at once and the
#: broker answers with an error (a retried script might also run twice). The pool
#: checks a connection before lending it and reopens one that Redis closed (after a
#: restart), so nothing broken is kept...
CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "retry": Retry(NoBackoff(), 0),
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": COMMAND_TIMEOUT,
}
try:  # ...unless redis-py >= 7 expects maintenance notifications, which skips that check
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    pass
else:
    CLIENT_OPTIONS["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)

#: Timeouts for talking to a sentinel: a dead one must cost a fraction of a second per
#: lookup, not redis-py's default 5 s times its retries.
SENTINEL_OPTIONS: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0,
                                    "retry": Retry(NoBackoff(), 0)}


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is; falsy when the broker runs without it (the embedded default)."""

    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = "mymaster"
    password: str | None = None
    sentinel_password: str | None = None
    db: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedisTarget:
        """Read the ``REDIS_*`` variables; a malformed one raises :class:`BadSetting`."""
        sentinels = []
        for part in filter(None, (p.strip() for p in environ.get("REDIS_SENTINELS", "")
                                  .split(","))):
            host, sep, port = part.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise BadSetting(f"REDIS_SENTINELS: '{part}' is not host:port")
            sentinels.append((host.strip("[]"), int(port)))
        db = environ.get("REDIS_DB", "0")
        if not db.isdigit():
            raise BadSetting(f"REDIS_DB: '{db}' is not a database number")
        target = cls(url=environ.get("REDIS_URL", ""), sentinels=tuple(sentinels),
                     master_name=environ.get("REDIS_SENTINEL_MASTER") or "mymaster",
                     password=environ.get("REDIS_PASSWORD") or None,
                     sentinel_password=environ.get("REDIS_SENTINEL_PASSWORD") or None,
                     db=int(db))
        if target.url and target.sentinels:
            raise BadSetting("Set REDIS_URL or REDIS_SENTINELS, not both")
        return target

    def __bool__(self) -> bool:
        return bool(self.url or self.sentinels)

    def __str__(self) -> str:
        """For logs: where, never the password."""
        if self.sentinels:
            return (f"master '{self.master_name}' via sentinels "
                    f"{', '.join(f'{h}:{p}' for h, p in self.sentinels)}")
        return self.url.split("@")[-1]

    def _sentinel(self) -> Sentinel:
        options = dict(SENTINEL_OPTIONS)
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        return Sentinel(list(self.sentinels), sentinel_kwargs=options)

    def layer_host(self, **options: Any) -> dict[str, Any]:
        """One entry of channels-redis's ``hosts`` (it supports both forms)."""
        if not self.sentinels:
            return {"address": self.url, **options}
        sentinel_kwargs = dict(SENTINEL_OPTIONS)
        if self.sentinel_password:
            sentinel_kwargs["password"] = self.sentinel_password
        return {"sentinels": list(self.sentinels), "master_name": self.master_name,
                "sentinel_kwargs": sentinel_kwargs, "db": self.db,
                **({"password": self.password} if self.password else {}), **options}

    def connect(self, **options: Any) -> Connection:
        """A client of the current master, to be used and closed on one event loop."""
        if not self.sentinels:
            return Connection(aioredis.Redis.from_url(self.url, **options))
        sentinel = self._sentinel()
        return Connection(sentinel.master_for(self.master_name, db=self.db,
                                              password=self.password, **options), sentinel)


@dataclass
class Connection:
    """A client and, with Sentinel, the sentinel clients it asks (closed with it)."""

    client: aioredis.Redis
    sentinel: Sentinel | None = None

    async def close(self) -> None:
        await self.client.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


class Clients:
    """One client (and connection pool) per event loop: a connection belongs to the
    loop that opened it, and tests, daphne and async_to_sync each run their own."""

    def __init__(self, target: RedisTarget, **options: Any) -> None:
        self.target = target
        self.options = options
        self._by_loop: dict[asyncio.AbstractEventLoop, Connection] = {}

    def get(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        connection = self._by_loop.get(loop)
        if connection is None:
            for old in [old for old in self._by_loop if old.is_closed()]:
                del self._by_loop[old]  # no loop left to close its sockets: the GC will
            connection = self._by_loop[loop] = self.target.connect(**self.options)
        return connection.client

    async def close(self) -> None:
        """Close this event loop's connections (at shutdown; at the end of a test)."""
        connection = self._by_loop.pop(asyncio.get_running_loop(), None)
        if connection is not None:
            await connection.close()
