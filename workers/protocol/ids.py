"""Ids for messages, requests, workers and sessions.

Kept apart for its process-wide state: the prefix of :func:`new_id` is renewed in a
forked child (``os.register_at_fork``), so that two processes never hand out the
same id. Code that needs ids calls the functions here, never copies the prefix.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time

_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)
_ID_KEY = secrets.randbits(64)
_MASK = 2**64 - 1


def _renew_id_prefix() -> None:
    global _ID_PREFIX, _id_counter, _ID_KEY
    _ID_PREFIX, _id_counter, _ID_KEY = secrets.token_hex(8), itertools.count(1), \
        secrets.randbits(64)


os.register_at_fork(after_in_child=_renew_id_prefix)


def _scrambled(n: int) -> int:
    """``n`` through a keyed bijection of 64-bit integers (splitmix64's finalizer): ids
    stay unique, and two of them no longer tell how many were made in between."""
    n = (n ^ _ID_KEY) & _MASK
    n = ((n ^ (n >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    n = ((n ^ (n >> 27)) * 0x94D049BB133111EB) & _MASK
    return n ^ (n >> 31)


def new_id() -> str:
    """A unique id for messages and requests: the time in milliseconds, 64 random bits
    per process, then a counter scrambled (a worker sees the ids of the requests it
    serves: a bare counter told it the broker's traffic).

    Time first, so that ids made together sort together: the job store's unique index
    on them takes each commit's rows at its right edge, a page or two, not a page per
    row (random keys cost a quarter more CPU per row written in SQLite). The broker
    makes one or two per request; ``uuid4`` costs a system call each (``os.urandom``),
    which showed up at ~9% of the broker's profile (this: ~0.5 us).
    """
    return f"{int(time.time() * 1000):011x}{_ID_PREFIX}{_scrambled(next(_id_counter)):016x}"


def random_id(nbytes: int = 6) -> str:
    """A random id (worker ids, sessions): unique without any counter to share."""
    return secrets.token_hex(nbytes)
