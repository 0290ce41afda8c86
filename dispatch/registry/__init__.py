"""Live state of the worker fleet, shared by everything that forwards requests.

One interface (:class:`Registry`, in :mod:`.base`); the in-process implementation
(:mod:`.memory`) serves the embedded default, the Redis one (:mod:`.redis`) several
processes. :func:`get_registry` picks one from the settings.
"""

from __future__ import annotations

from .. import conf
from ..errors import RegistryUnavailable, WorkerIdTaken
from .base import Outcome, Registry, Reservation, WorkerEntry

__all__ = ["Outcome", "Registry", "RegistryUnavailable", "Reservation", "WorkerEntry",
           "WorkerIdTaken", "get_registry", "reset_registry"]

_registry: Registry | None = None


def get_registry() -> Registry:
    """The registry of this process, created on first use from settings."""
    global _registry
    if _registry is None:
        from django.conf import settings

        if settings.REDIS:
            from .redis import RedisRegistry

            _registry = RedisRegistry(settings.REDIS, prefix=conf.get("REDIS_PREFIX"))
        else:
            from .memory import MemoryRegistry

            _registry = MemoryRegistry()
    return _registry


def reset_registry() -> None:
    """Forget all state (tests)."""
    global _registry
    _registry = None
