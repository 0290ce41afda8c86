"""The W3C trace context a request carries: the requester API takes it, the worker's
request envelope passes it on, and both read it with the one check here.
"""

from __future__ import annotations

import re
from typing import Any

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def parse_traceparent(value: Any) -> str | None:
    """A W3C ``traceparent`` (version-trace id-parent id-flags), or None for anything
    else: version ff, all-zero ids, or text that is not one. A later version's extra
    fields are cut off (what version 00 defines is kept)."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    head = value[:55]
    match = _TRACEPARENT.fullmatch(head)
    if match is None or (len(value) > 55 and (match[1] == "00" or value[55] != "-")):
        return None
    version, trace_id, parent_id = match.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return head
