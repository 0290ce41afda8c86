"""Ids for messages, requests, workers and sessions.

Kept apart for its process-wide state: the prefix of :func:`new_id` is renewed in a
forked child (``os.register_at_fork``), so that two processes never hand out the
same id. Code that needs ids calls the functions here, never copies the prefix.
"""

from __future__ import annotations

import itertools
import os
import secrets

_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


def _renew_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX, _id_counter = secrets.token_hex(8), itertools.count(1)


os.register_at_fork(after_in_child=_renew_id_prefix)


def new_id() -> str:
    """A unique id for messages and requests: 64 random bits per process, then a counter.

    The broker makes one or two per request; ``uuid4`` costs a system call each
    (``os.urandom``), which showed up at ~9% of the broker's profile. Not secret.
    """
    return f"{_ID_PREFIX}{next(_id_counter):x}"


def random_id(nbytes: int = 6) -> str:
    """A random id (worker ids, sessions): unique without any counter to share."""
    return secrets.token_hex(nbytes)
