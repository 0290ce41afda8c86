"""Reading one field of a peer's frame: of the right type, within its limits, or a
:class:`ProtocolError` that names the field and what is wrong with it.

Every parser of both formats reads its fields through here, so a peer gets the same
wording for the same mistake wherever it makes it.
"""

from __future__ import annotations

from typing import Any

from .errors import ProtocolError
from .text import quote

#: Longest command/action name, request id and worker id or name a peer may send:
#: they end up in logs, history rows and error texts, so they are kept short.
MAX_NAME_CHARS = 200
MAX_ID_CHARS = 128
#: Most commands one worker may register.
MAX_COMMANDS = 1000
#: The longest timeout the protocol takes; the broker's MAX_TIMEOUT may be shorter.
MAX_PROTOCOL_TIMEOUT = 30 * 86400


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...,
           request_id: str | None = None) -> Any:
    """Read one field, checking its type; ``...`` as default makes it required."""
    if name not in obj or obj[name] is None:
        if default is ...:
            raise ProtocolError(f"Missing field '{name}'", request_id=request_id)
        return default
    value = obj[name]
    # bool is an int subclass: never accept it where a number is wanted.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise ProtocolError(
            f"Field '{name}' must be {want}, got {kind_of(value)}", request_id=request_id
        )
    return value


def kind_of(value: Any) -> str:
    """The JSON kind of a parsed value, in Python's words (an integer a relay kept as its
    text, an orjson Fragment, is an int)."""
    kind = type(value).__name__
    return "int" if kind == "Fragment" else kind


def _text(obj: dict[str, Any], name: str, limit: int, default: Any = ...,
          request_id: str | None = None) -> Any:
    """A string field of at most ``limit`` characters (names and ids)."""
    value = _field(obj, name, str, default, request_id)
    if isinstance(value, str) and len(value) > limit:
        raise ProtocolError(f"Field '{name}' is too long ({len(value)} characters, limit "
                            f"{limit})", request_id=request_id)
    return value


def _names(obj: dict[str, Any], name: str, default: Any = ...) -> list[str]:
    """A list of command names: non-empty strings of at most MAX_NAME_CHARS, MAX_COMMANDS."""
    value = _field(obj, name, list, default)
    if not all(isinstance(c, str) and c for c in value):
        raise ProtocolError(f"Field '{name}' must be a list of non-empty strings")
    if len(value) > MAX_COMMANDS:
        raise ProtocolError(f"Field '{name}' lists {len(value)} commands (limit "
                            f"{MAX_COMMANDS})")
    long = next((c for c in value if len(c) > MAX_NAME_CHARS), None)
    if long is not None:
        raise ProtocolError(f"Field '{name}' has a name of {len(long)} characters (limit "
                            f"{MAX_NAME_CHARS}): '{quote(long, 40)}'")
    odd = next((c for c in value if not c.isprintable()), None)
    if odd is not None:
        raise ProtocolError(f"Field '{name}' has a name that is not printable text: "
                            f"'{quote(odd, 40)}'")
    return value


def _seconds_or_weight(obj: dict[str, Any], name: str, default: float) -> float:
    """A number field as float; an integer too large for a float is refused, not raised."""
    try:
        return float(_field(obj, name, (int, float), default))
    except OverflowError:
        raise ProtocolError(f"Field '{name}' is out of range") from None


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
