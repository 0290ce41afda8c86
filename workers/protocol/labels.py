"""Labels: what a worker carries (``{"gpu": "a100"}``) and what a request selects
workers by. Both formats read them, and the broker's HTTP API too, with one check.

Names that start with ``@`` are the broker's: a worker token's pools are labels
``@pool:<name>`` that only the token gives (a worker cannot claim them), and a
requester key of a pool selects them on every request it sends.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import ProtocolError

#: Labels a worker may carry, and the characters of a label's name or value.
MAX_LABELS = 32
MAX_LABEL_CHARS = 64
#: Label names of this prefix are given by the broker, never claimed by a worker.
RESERVED = "@"
POOL_PREFIX = "@pool:"
#: A pool's name: what a token may be given (``token create ... --pool NAME``).
POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,%d}" % (MAX_LABEL_CHARS - len(POOL_PREFIX)))


def pool_label(pool: str) -> tuple[str, str]:
    """The label a worker of ``pool`` carries, and a requester key of it selects."""
    return POOL_PREFIX + pool, "1"


def label(text: str) -> tuple[str, str]:
    """One label from the command line, ``NAME=VALUE`` (an argparse type)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(text)
    return name, value


def parse_labels(value: Any, name: str, claimed: bool = False) -> dict[str, str]:
    """A label map (``{"gpu": "a100"}``): short strings to short strings. ``claimed``:
    a worker's own, which may not use the broker's names (:data:`RESERVED`)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and k and len(k) <= MAX_LABEL_CHARS
            and len(v) <= MAX_LABEL_CHARS and k.isprintable() and v.isprintable()
            for k, v in value.items()):
        raise ProtocolError(f"Field '{name}' must map up to {MAX_LABELS} names to values "
                            f"(printable strings of at most {MAX_LABEL_CHARS} characters)")
    if claimed and any(k.startswith(RESERVED) for k in value):
        raise ProtocolError(f"Field '{name}': names starting with '{RESERVED}' are given by "
                            "the broker (a worker token's pools), not claimed")
    return dict(value)
