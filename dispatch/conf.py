"""The broker's settings: one typed, validated model, read from one place.

Each setting comes from ``settings.BROKER`` (a dict), which ``brokersite/settings.py``
fills from the ``BROKER_<NAME>`` environment variables; ``runbroker`` flags override
it (:func:`override`). The dict is validated as a whole by :class:`BrokerSettings`
(pydantic) when the app starts, so a bad value (``BROKER_MAX_RETRIES=2.5``) stops
the start with a message naming it, instead of failing at the first request. The
validated values are cached: :func:`get` is on the hot path.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
from functools import cache
from typing import Any, Literal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("dispatch.conf")

#: ``BROKER_*`` environment variables that are not broker settings but the clients'
#: (``BROKER_URL`` for management commands, ``BROKER_TOKEN`` for workers) or the
#: project's (brokersite/settings.py: Django tasks and dispatch.fleet).
NOT_SETTINGS = frozenset({"URL", "TOKEN", "TASK_QUEUES", "TASK_MODULES", "FLEET_URL",
                          "FLEET_KEY"})

MiB = 1_048_576


class BadSetting(ImproperlyConfigured):
    """A setting that cannot be used; its message names it and says why."""



def _doc(default: Any, description: str, **constraints: Any) -> Any:
    return Field(default, description=description, **constraints)


class BrokerSettings(BaseModel):
    """Every broker setting, its default, its bounds and what it is.

    The README's configuration table lists each of them (a test checks).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, validate_default=True)

    HOST: str = _doc("127.0.0.1", "interface the three sockets listen on")
    WORKER_PORT: int = _doc(8765, "worker socket port", ge=1, le=65535)
    REQUESTER_PORT: int = _doc(8766, "requester socket port", ge=1, le=65535)
    HTTP_PORT: int = _doc(8000, "HTTP port: admin, /healthz, control API", ge=1, le=65535)
    STRATEGY: Literal["least_loaded", "round_robin", "random", "weighted_random"] = _doc(
        "least_loaded", "load balancing: least_loaded, round_robin, random, weighted_random")
    TIMEOUT: float = _doc(30.0, "seconds a request may take before 'Worker response timeout'",
                          gt=0, le=30 * 86400)
    MAX_TIMEOUT: float = _doc(86400.0, "longest timeout a request may ask for (seconds); "
                                       "long jobs may take hours", gt=0, le=30 * 86400)
    MAX_DEFER: float = _doc(30 * 86400.0, "how far ahead a request's not_before may be "
                                          "(30d, 12h; seconds)", ge=0)
    MAX_KEEP: float = _doc(30 * 86400.0, "longest keep a request may ask for: how long its "
                                         "answer stays in the job store (30d, 12h; seconds)",
                           ge=0)
    CANCEL_GRACE: float = _doc(10.0, "seconds a worker has to confirm a cancel before its "
                                     "slot is given back anyway", gt=0)
    RESULT_TTL: float = _doc(300.0, "seconds a request's final answer is kept for re-attach; "
                                    "0: not kept", ge=0)
    DEAD_LETTER_TTL: float = _doc(7 * 86400.0, "how long a job that failed for want of a "
                                               "worker (worker_lost, lease_expired, timeout, "
                                               "a handler's failure) is kept in the job "
                                               "store to be run again from the admin "
                                               "(30d, 12h; 0: RESULT_TTL like the rest)",
                                  ge=0)
    RESULT_STORE_BYTES: int = _doc(64 * MiB, "bytes of final answers kept in memory for "
                                             "re-attach at most (oldest go first)", ge=0)
    EJECT_AFTER: int = _doc(5, "infrastructure faults in a row (leases that ran out) after "
                               "which a worker is out of rotation", ge=1)
    EJECT_SECONDS: float = _doc(30.0, "how long a worker is out the first time; doubled each "
                                      "time again", gt=0)
    EJECT_MAX_SECONDS: float = _doc(300.0, "longest time out of rotation", gt=0)
    EJECT_MAX_SHARE: float = _doc(0.5, "share of the workers offering a command that may be "
                                       "out of rotation at once", ge=0, le=1)
    CANARY: str = _doc("", "canary routing, comma-separated command=version:percent, e.g. "
                           "resize=2.1:10 sends 10% of resize to workers of version 2.1")
    HEDGE_MAX_SHARE: float = _doc(0.1, "share of requests that may be hedged (sent to a "
                                       "second worker when the first is slow)", ge=0, le=1)
    MAX_RETRIES: int = _doc(2, "times a request is re-sent after its worker was lost", ge=0)
    QUEUE_LIMIT: int = _doc(1000, "requests per process that may wait for a free worker slot; "
                                  "when full, one credential's newcomer makes room by pushing "
                                  "out the newest of the credential holding the most", ge=0)
    QUEUE_MAX_WAIT: float = _doc(3600.0, "seconds a request may wait for a free worker slot "
                                         "before it is answered all_busy (0: its timeout)",
                                 ge=0)
    HEARTBEAT_INTERVAL: float = _doc(5.0, "seconds between heartbeats, told to workers on "
                                          "connect", gt=0)
    HEARTBEAT_MISSES: int = _doc(3, "heartbeat intervals of silence before a worker is "
                                    "dropped", ge=1)
    REGISTER_TIMEOUT: float = _doc(10.0, "seconds a new worker socket has to send its "
                                         "connect frame", gt=0)
    MAX_MESSAGE_BYTES: int = _doc(MiB, "largest frame accepted; larger ones get an error",
                                  ge=1024)
    MAX_IN_FLIGHT: int = _doc(1000, "requests one requester connection may have in flight",
                              ge=1)
    MAX_IN_FLIGHT_BYTES: int = _doc(32 * MiB, "bytes of requests one requester connection "
                                              "may have in flight, counted as they cost parsed; "
                                              "beyond, new ones are refused", ge=1024)
    MAX_CONNECTIONS_PER_ADDRESS: int = _doc(
        1000, "open connections one source address (an IPv6 /64) may have on all ports; "
              "more are closed on accept (0: no cap; a trusted proxy is not capped)", ge=0)
    HEAD_TIMEOUT: float = _doc(10.0, "seconds a connection may take to send its request (or "
                                     "sit idle between requests) before it is closed; "
                                     "websockets are past it", gt=0)
    MAX_PENDING: int = _doc(10_000, "unanswered requests one credential may have per process, "
                                    "whatever connections sent them", ge=1)
    MAX_PENDING_BYTES: int = _doc(256 * MiB, "bytes of unanswered requests one credential may "
                                             "have per process, counted as they cost parsed",
                                  ge=1024)
    MAX_KEPT_BYTES: int = _doc(1024 * MiB, "bytes of requests and answers one credential may "
                                           "have kept past RESULT_TTL per process (keep, dead "
                                           "letters); beyond, answers are kept RESULT_TTL",
                               ge=0)
    MAX_UNSENT_BYTES: int = _doc(4 * MiB, "bytes sent to one connection that it has not read "
                                          "yet, at most; beyond, it is closed with 4009",
                                 ge=65536)
    MAX_WORKER_WEIGHT: float = _doc(100.0, "highest weight a worker may register; more is "
                                           "capped", gt=0)
    MAX_WORKER_CONCURRENCY: int = _doc(1000, "highest max_concurrency a worker may register; "
                                             "more is capped", ge=1)
    WORKER_ID_CLAIM_SECONDS: float = _doc(3600.0, "seconds a worker id stays with its "
                                                  "credential after the worker left", ge=0)
    CLIENT_INFO_ADDRESSES: bool = _doc(False, "get_client_info tells workers each other's "
                                              "addresses")
    RATE_LIMIT: int = _doc(20_000, "frames per second one connection may send (bursts of "
                                   "twice that); beyond, it is closed with 4008. 0: no limit",
                           ge=0)
    SHUTDOWN_GRACE: float = _doc(10.0, "seconds SIGTERM waits for requests in flight to "
                                       "finish", ge=0)
    RECONNECT_RATE: float = _doc(2000.0, "workers a second a stopping broker asks to come "
                                         "back at: each is told a random delay within "
                                         "workers / rate seconds", gt=0)
    JOB_STORE: bool = _doc(True, "keep every accepted request in the database until it is "
                                 "answered, so that a broker restart or crash loses none")
    STORE_COMMIT_SECONDS: float = _doc(0.005, "how long the job store gathers changes before "
                                              "it commits them: a request is safe from a "
                                              "crash this long after it arrived", gt=0, le=1)
    ADOPT_GRACE: float = _doc(30.0, "seconds a job that was running when the broker stopped "
                                    "waits for its worker to come back and report it, before "
                                    "it is run again (or, if not idempotent, answered "
                                    "worker_lost)", ge=0)
    HISTORY: bool = _doc(True, "record request history in the database (batched)")
    HISTORY_FLUSH_SECONDS: float = _doc(1.0, "how often buffered history is written", gt=0)
    HISTORY_BUFFER: int = _doc(50_000, "history records kept in memory at most; older are "
                                       "dropped", ge=0)
    HISTORY_BUFFER_BYTES: int = _doc(64 * MiB, "bytes of history kept in memory at most; "
                                               "older records are dropped", ge=0)
    HISTORY_RETENTION: float = _doc(0.0, "how long request history and offline worker "
                                         "registrations are kept (30d, 12h, 2w; seconds "
                                         "without a unit); older rows are deleted about "
                                         "once an hour. 0: forever", ge=0)
    API_TOKEN: str = _doc("", "static bearer token for the HTTP control API (admin keys work "
                              "too); setting it ends protected mode")
    ALLOWED_ORIGINS: str = _doc("", "browser origins allowed on the worker and requester "
                                    "sockets and the control API (comma-separated; * for any)")
    TRUSTED_PROXIES: str = _doc("", "proxy addresses (or networks) whose X-Forwarded-For is "
                                    "believed, comma-separated")
    AUTH_REFRESH_SECONDS: float = _doc(2.0, "how often credentials are reloaded (revocation "
                                            "delay)", gt=0)
    ACTION_MODULES: str = _doc("", "comma-separated modules that register server actions")
    REDIS_PREFIX: str = _doc("dispatch", "prefix of every Redis key (registry and channel "
                                         "layer)", min_length=1)
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = _doc(
        "INFO", "broker log level")
    ECHO_ROUTE: bool = _doc(False, "tests only: serve /ws/echo/, which sends every frame back "
                                   "unchanged (for the Autobahn protocol suite); never in "
                                   "production")


    @field_validator("CANARY")
    @classmethod
    def _canary_rules(cls, value: str) -> str:
        from .balancing import parse_canaries

        parse_canaries(value)  # raises ValueError, which pydantic reports with the name
        return value

    @field_validator("HISTORY_RETENTION", "DEAD_LETTER_TTL", "MAX_DEFER", "MAX_KEEP",
                     mode="before")
    @classmethod
    def _retention(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


#: Seconds per unit of a duration: ``90s``, ``15m``, ``12h``, ``30d``, ``2w``.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``2w``, ``1.5h`` or ``3600`` (no unit: seconds).

    Retention is set by people in days and weeks; one number with one unit is all it
    takes, and anything else is refused rather than guessed at.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: a number and one of "
                         f"{', '.join(DURATION_UNITS)} (e.g. 30d, 12h, 2w)")
    number, unit = match.groups()
    return float(number) * DURATION_UNITS[unit.lower() or "s"]


#: Setting names, in the order the model declares them.
NAMES: tuple[str, ...] = tuple(BrokerSettings.model_fields)

_current: BrokerSettings | None = None


@cache
def _warn_unknown(names: tuple[str, ...]) -> None:
    """Said once a process (settings are validated again at each override)."""
    log.warning("unknown broker setting(s) ignored: %s",
                ", ".join(f"BROKER_{name}" for name in names))


def load(values: dict[str, Any]) -> BrokerSettings:
    """Validate ``values`` (names without the ``BROKER_`` prefix); raise a readable error."""
    unknown = tuple(sorted(set(values) - set(NAMES) - NOT_SETTINGS))
    if unknown:
        _warn_unknown(unknown)
    try:
        return BrokerSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"BROKER_{'.'.join(str(p) for p in error['loc'])}={error.get('input')!r}: "
            f"{error['msg']}" for error in exc.errors())
        raise BadSetting(f"Bad broker setting: {problems}") from None


def current() -> BrokerSettings:
    """The validated settings (validated once, again after a change)."""
    global _current
    if _current is None:
        _current = load(settings.BROKER)
    return _current


def get(name: str) -> Any:
    """The current value of one broker setting."""
    return getattr(_current or current(), name)


def override(**values: Any) -> None:
    """Set broker settings at run time (``runbroker`` flags use this); validated at once."""
    global _current
    unknown = set(values) - set(NAMES)
    if unknown:
        raise KeyError(f"unknown broker setting(s) {', '.join(sorted(unknown))}")
    merged = {**settings.BROKER, **values}
    _current = load(merged)
    settings.BROKER.update(values)


def _forget(*, setting: str, **_: Any) -> None:
    """``override_settings(BROKER=...)`` (tests): validate the new dict on next use."""
    global _current
    if setting == "BROKER":
        _current = None


setting_changed.connect(_forget)


@cache
def process_name() -> str:
    """This broker process's name in the shared registry and in history rows.

    Host and pid say where it runs; a random tail keeps a restarted process with a
    recycled pid from being taken for its predecessor.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:4]}"
