"""Labels: what a worker carries (``{"gpu": "a100"}``) and what a request selects
workers by. Both formats read them, and the broker's HTTP API too, with one check.
"""

from __future__ import annotations

from typing import Any

from .errors import ProtocolError

#: Labels a worker may carry, and the characters of a label's name or value.
MAX_LABELS = 32
MAX_LABEL_CHARS = 64


def label(text: str) -> tuple[str, str]:
    """One label from the command line, ``NAME=VALUE`` (an argparse type)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(text)
    return name, value


def parse_labels(value: Any, name: str) -> dict[str, str]:
    """A label map (``{"gpu": "a100"}``): short strings to short strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and k and len(k) <= MAX_LABEL_CHARS
            and len(v) <= MAX_LABEL_CHARS and k.isprintable() and v.isprintable()
            for k, v in value.items()):
        raise ProtocolError(f"Field '{name}' must map up to {MAX_LABELS} names to values "
                            f"(printable strings of at most {MAX_LABEL_CHARS} characters)")
    return dict(value)
