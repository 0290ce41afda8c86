"""Lua scripts, kept as ``.lua`` files in ``lua/`` beside this module.

Each is run with redis-py's own script support (``AsyncScript``: by its SHA1, and
loaded again when a Redis lacks it, as after a restart or a Sentinel failover).
The registry's scripts share ``prelude.lua``, joined in front of each here.
"""

from __future__ import annotations

from importlib.resources import files

from redis.commands.core import AsyncScript

_LUA = files(__package__) / "lua"


def load(*names: str) -> AsyncScript:
    """The script made of these ``.lua`` files, in order.

    As bytes, so that no client is needed to compute its SHA1; it is run on any
    client: ``await script(keys=[...], args=[...], client=client)``.
    """
    source = "\n".join((_LUA / f"{name}.lua").read_text(encoding="utf-8") for name in names)
    return AsyncScript(None, source.encode())  # type: ignore[arg-type]
