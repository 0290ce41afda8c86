"""What the broker itself answers: server actions and extra message types.

Workers may send ``request`` frames to the broker (the seed's server side:
``get_time``, ``get_client_info``, ``calculate``). More actions are one decorated
function in a module named by the ``ACTION_MODULES`` setting::

    from dispatch.control.actions import server_action

    @server_action()
    async def ping() -> str:
        return "pong"

New envelope types get a handler the same way, with :func:`on_message`; it is
called with the worker consumer and the parsed :class:`~workers.protocol.Message`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from workers.builtin import calculate_value, now_text
from workers.handlers import CommandRegistry
from workers.protocol import Message

from .. import conf
from ..registry import get_registry

actions = CommandRegistry()
server_action = actions.command

MessageHandler = Callable[[Any, Message], Awaitable[None]]
message_handlers: dict[str, MessageHandler] = {}


def on_message(kind: str) -> Callable[[MessageHandler], MessageHandler]:
    """Register the broker's handler for envelope type ``kind`` from workers."""

    def register(func: MessageHandler) -> MessageHandler:
        message_handlers[kind] = func
        return func

    return register


@server_action()
async def get_time() -> str:
    """The broker's local time, ``YYYY-MM-DD HH:MM:SS``."""
    return now_text()


@server_action()
async def get_client_info(*, ctx: Caller) -> dict[str, Any]:
    """The online workers of the asking worker's credential, and their load.

    Any worker may ask, so it is told about its own fleet only (ids, names, load),
    not where they are (``CLIENT_INFO_ADDRESSES``), nor how many workers other
    credentials have (a tenant's fleet size is its own business).
    """
    fields = CLIENT_INFO_FIELDS + (("address", "process") if conf.get("CLIENT_INFO_ADDRESSES")
                                   else ())
    own = [w for w in await get_registry().all() if w.owner == ctx.owner]
    workers = [{k: v for k, v in w.to_dict().items() if k in fields}
               for w in own[:CLIENT_INFO_MAX]]
    return {"count": len(own), "workers": workers}


#: What get_client_info tells about each worker, and about how many at most.
CLIENT_INFO_FIELDS = ("worker_id", "name", "weight", "max_concurrency", "in_flight",
                      "draining")
CLIENT_INFO_MAX = 1000


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks a server action: passed to an action that takes ``ctx``."""

    owner: str  # auth.Grant.owner of the asking worker's connection
    worker_id: str


@server_action()
async def calculate(a: Any = None, b: Any = None, op: str = "+") -> float | int:
    """``a op b`` for op in + - * /, computed by the broker."""
    return calculate_value(a, b, op)


def load_action_modules() -> None:
    """Import the modules named in ``ACTION_MODULES`` so their decorators run."""
    for name in filter(None, (n.strip() for n in conf.get("ACTION_MODULES").split(","))):
        importlib.import_module(name)
