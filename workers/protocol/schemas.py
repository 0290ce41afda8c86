"""Command schemas a worker registers (what each command takes and does, for
``describe``): checked here so that the broker keeps only small, well-formed ones.

A schema only describes a command, so a bad one costs that command its description,
never the worker its registration.
"""

from __future__ import annotations

from typing import Any

from .codec import dumps, loads
from .errors import ProtocolError
from .fields import kind_of
from .text import quote

#: A worker's command schemas at most, as compact JSON, in bytes: the broker keeps
#: them for every worker, so they must stay small beside the rest of its entry.
MAX_SCHEMAS_BYTES = 16384
#: Parameters one schema may list, and characters of any text in it (a name, a type,
#: the docstring's first line, a default's JSON or repr).
MAX_PARAMS = 64
MAX_SCHEMA_CHARS = 200
#: Reasons for dropped schemas kept (and told to the worker) at most.
MAX_SCHEMA_REASONS = 10


class SchemaError(ProtocolError):
    """A command schema that is not kept: the worker registers without it."""


def parse_schemas(value: dict[str, Any], commands: list[str]
                  ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The schemas of a registration worth keeping, and why the others were dropped.

    A schema only describes a command, so a bad one costs that command its
    description, never the worker its registration (nor can a newer worker's richer
    schemas lock it out of an older broker). The whole field is dropped when its
    compact JSON is over MAX_SCHEMAS_BYTES; one command's schema when it is not
    :func:`parse_schema`'s or names a command the worker does not offer.
    """
    if not value:
        return {}, []
    try:
        size = len(dumps(value).encode())
    except RecursionError:
        return {}, ["Field 'schemas' is nested too deeply"]
    if size > MAX_SCHEMAS_BYTES:
        return {}, [f"Field 'schemas' is {size} bytes as compact JSON (limit "
                    f"{MAX_SCHEMAS_BYTES})"]
    offered = set(commands)
    kept: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for command, schema in value.items():
        try:
            if command not in offered:
                raise SchemaError("not a command of this worker")
            kept[command] = parse_schema(schema)
        except SchemaError as exc:
            dropped.append(f"schema of '{quote(command, 40)}': {exc}")
    if len(dropped) > MAX_SCHEMA_REASONS:
        dropped[MAX_SCHEMA_REASONS - 1:] = [
            f"and {len(dropped) - MAX_SCHEMA_REASONS + 1} more"]
    return kept, dropped


def parse_schema(value: Any) -> dict[str, Any]:
    """One command's schema, checked, with only the keys this version knows.

    ``{"params": [{"name", "type"?, "required", "default"? | "default_repr"?}, ...],
    "returns"?, "doc"?, "extra"?, "stream"?}``: ``extra`` when the handler takes
    parameters beyond those listed (``**kwargs``), ``stream`` when it streams chunks.
    Texts are printable and short; a ``default`` is JSON of at most MAX_SCHEMA_CHARS.
    Raises :class:`SchemaError`.
    """
    if not isinstance(value, dict):
        raise SchemaError(f"must be an object, got {kind_of(value)}")
    params = value.get("params")
    if not isinstance(params, list):
        raise SchemaError("'params' must be a list")
    if len(params) > MAX_PARAMS:
        raise SchemaError(f"lists {len(params)} parameters (limit {MAX_PARAMS})")
    out: dict[str, Any] = {"params": [_param(p, i) for i, p in enumerate(params, 1)]}
    names = [p["name"] for p in out["params"]]
    if len(set(names)) < len(names):
        raise SchemaError("lists a parameter twice")
    for key in ("returns", "doc"):
        text = _schema_text(value, key)
        if text:
            out[key] = text
    for key in ("extra", "stream"):
        flag = value.get(key, False)
        if not isinstance(flag, bool):
            raise SchemaError(f"'{key}' must be true or false")
        if flag:
            out[key] = True
    return out


def _param(value: Any, number: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"parameter {number} must be an object")
    name = _schema_text(value, "name", f"parameter {number}")
    if not name:
        raise SchemaError(f"parameter {number} must have a 'name'")
    out: dict[str, Any] = {"name": name}
    kind = _schema_text(value, "type", f"parameter '{name}'")
    if kind:
        out["type"] = kind
    required = value.get("required")
    if not isinstance(required, bool):
        raise SchemaError(f"parameter '{name}': 'required' must be true or false")
    out["required"] = required
    if "default" in value and "default_repr" in value:
        raise SchemaError(f"parameter '{name}' has both 'default' and 'default_repr'")
    if required and ("default" in value or "default_repr" in value):
        raise SchemaError(f"parameter '{name}' is required, yet has a default")
    if "default" in value:
        out["default"] = _default(value["default"], name)
    elif "default_repr" in value:
        out["default_repr"] = _schema_text(value, "default_repr", f"parameter '{name}'")
    return out


def _schema_text(obj: dict[str, Any], key: str, where: str = "") -> str:
    """A text of a schema: printable, at most MAX_SCHEMA_CHARS; "" when absent."""
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_SCHEMA_CHARS \
            or not value.isprintable():
        raise SchemaError(f"{where + ': ' if where else ''}'{key}' must be printable text of "
                          f"at most {MAX_SCHEMA_CHARS} characters")
    return value


def _default(value: Any, name: str) -> Any:
    """A default value: JSON that reads back as itself (an overflowed 1e400 would not)."""
    try:
        text = dumps(value)
    except RecursionError:
        raise SchemaError(f"parameter '{name}': 'default' is nested too deeply") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"parameter '{name}': 'default' is {len(text)} characters of JSON "
                          f"(limit {MAX_SCHEMA_CHARS})")
    if loads(text) != value:
        raise SchemaError(f"parameter '{name}': 'default' is not plain JSON")
    return value
