"""Peer-supplied text made safe to log: every error text and log line that quotes
what a peer sent goes through :func:`quote`, on both sides.
"""

from __future__ import annotations

from typing import Any

#: C0 and C1 control characters, DEL and the Unicode line separators: what could
#: forge a log line or hide text in a terminal.
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_UNSAFE.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028",
                0x2029: "\\u2029"})


def quote(value: Any, limit: int = 100) -> str:
    """A peer-supplied value made safe to put in a log line or an error text.

    Control characters are escaped (no forged lines) and the text is cut to about
    ``limit`` characters, saying how much was left out (no log floods).
    """
    text = value if isinstance(value, str) else repr(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = text.translate(_UNSAFE)
    return f"{text}...(+{cut} chars)" if cut > 0 else text
