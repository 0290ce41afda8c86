"""The broker's settings, their defaults, and where they come from.

Each can be set in ``settings.BROKER`` (a dict) or as an environment variable
``BROKER_<NAME>``; ``runbroker`` flags override both. Values are read lazily, so a
flag applied at start-up is seen everywhere.
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import cache
from typing import Any

from django.conf import settings

#: name -> (default, what it is). The README's configuration table mirrors this.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "HOST": ("127.0.0.1", "interface the three sockets listen on"),
    "WORKER_PORT": (8765, "worker socket port"),
    "REQUESTER_PORT": (8766, "requester socket port"),
    "HTTP_PORT": (8000, "HTTP port: admin, /healthz, control API"),
    "STRATEGY": ("least_loaded",
                 "load balancing: least_loaded, round_robin, random, weighted_random"),
    "TIMEOUT": (30.0, "seconds a request may take before 'Worker response timeout'"),
    "MAX_RETRIES": (2, "times a request is re-sent after its worker was lost"),
    "QUEUE_LIMIT": (1000, "requests per process that may wait for a free worker slot"),
    "HEARTBEAT_INTERVAL": (5.0, "seconds between heartbeats, told to workers on connect"),
    "HEARTBEAT_MISSES": (3, "heartbeat intervals of silence before a worker is dropped"),
    "REGISTER_TIMEOUT": (10.0, "seconds a new worker socket has to send its connect frame"),
    "MAX_MESSAGE_BYTES": (1_048_576, "largest frame accepted; larger ones get an error"),
    "MAX_IN_FLIGHT": (1000, "requests one requester connection may have in flight"),
    "MAX_IN_FLIGHT_BYTES": (8 * 1_048_576, "bytes of requests one requester connection may "
                                           "have in flight; beyond, new ones are refused"),
    "MAX_UNSENT_BYTES": (4 * 1_048_576, "bytes sent to one connection that it has not read "
                                        "yet, at most; beyond, it is closed with 4008"),
    "MAX_WORKER_WEIGHT": (100.0, "highest weight a worker may register; more is capped"),
    "MAX_WORKER_CONCURRENCY": (1000, "highest max_concurrency a worker may register; more "
                                     "is capped"),
    "WORKER_ID_CLAIM_SECONDS": (3600.0, "seconds a worker id stays with its credential "
                                        "after the worker left"),
    "CLIENT_INFO_ADDRESSES": (False, "get_client_info tells workers each other's "
                                     "addresses"),
    "RATE_LIMIT": (20_000, "frames per second one connection may send (bursts of twice "
                           "that); beyond, it is closed with 4008. 0: no limit"),
    "SHUTDOWN_GRACE": (10.0, "seconds SIGTERM waits for requests in flight to finish"),
    "HISTORY": (True, "record request history in the database (batched)"),
    "HISTORY_FLUSH_SECONDS": (1.0, "how often buffered history is written"),
    "HISTORY_BUFFER": (50_000, "history records kept in memory at most; older are dropped"),
    "HISTORY_BUFFER_BYTES": (64 * 1_048_576, "bytes of history kept in memory at most; "
                                             "older records are dropped"),
    "API_TOKEN": ("", "static bearer token for the HTTP control API (admin keys work too)"),
    "ALLOWED_ORIGINS": ("", "browser origins allowed on the worker and requester sockets "
                            "and the control API (comma-separated; * for any)"),
    "TRUSTED_PROXIES": ("", "proxy addresses (or networks) whose X-Forwarded-For is "
                            "believed, comma-separated"),
    "AUTH_REFRESH_SECONDS": (2.0, "how often credentials are reloaded (revocation delay)"),
    "ACTION_MODULES": ("", "comma-separated modules that register server actions"),
    "REDIS_PREFIX": ("dispatch", "prefix of every Redis key (registry and channel layer)"),
    "ECHO_ROUTE": (False, "tests only: serve /ws/echo/, which sends every frame back "
                          "unchanged (for the Autobahn protocol suite); never in production"),
}


def get(name: str) -> Any:
    """The current value of one broker setting, converted to its default's type."""
    default, _ = DEFAULTS[name]
    value = settings.BROKER.get(name, default)
    return _coerce(value, default)


def override(**values: Any) -> None:
    """Set broker settings at run time (``runbroker`` flags use this)."""
    for name, value in values.items():
        if name not in DEFAULTS:
            raise KeyError(f"unknown broker setting {name}")
        settings.BROKER[name] = value


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(value, str) and not isinstance(default, str):
        if isinstance(default, bool):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return type(default)(value)
    return value


@cache
def process_name() -> str:
    """This broker process's name in the shared registry and in history rows.

    Host and pid say where it runs; a random tail keeps a restarted process with a
    recycled pid from being taken for its predecessor.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:4]}"
