"""The command registry: one decorated function per command.

Adding a command to a worker is one function::

    from workers.handlers import command

    @command()
    async def resize(url: str, width: int = 256) -> dict:
        ...

Parameters arrive as keyword arguments taken from the request's ``params`` (the
requester's ``data``). A handler that declares a keyword-only ``ctx`` parameter also
gets the context of the call (who asked, and later its job); ``ctx`` can never come
from the request itself. A plain ``def`` runs in a thread so that a slow or blocking
handler never stalls the worker's heartbeats or its other requests. Whatever a
handler raises becomes an error answer; the worker itself stays up.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple

from .protocol import ErrorCode

Handler = Callable[..., Any]


class CommandError(Exception):
    """Raise this from a handler to answer with exactly this message as the error.

    It is the caller's mistake or the command's own refusal, not the worker's ill
    health: the broker does not count it against the worker.
    """

    code = ErrorCode.COMMAND_ERROR


class UnknownCommand(CommandError):
    code = ErrorCode.UNKNOWN_COMMAND


class BadParams(CommandError):
    code = ErrorCode.BAD_PARAMS


#: The parameter name through which a handler receives the context of its call.
CONTEXT = "ctx"


@dataclass(frozen=True, slots=True)
class _Entry:
    func: Handler
    signature: inspect.Signature
    is_async: bool
    idempotent: bool
    lease: float | None = None
    streams: bool = False  # a generator: each item is one chunk
    hedge: bool = False  # the broker may send a copy to a second worker when slow

    @property
    def wants_context(self) -> bool:
        param = self.signature.parameters.get(CONTEXT)
        return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


class CommandRegistry:
    """Maps command names to handlers, and runs them with checked parameters."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def command(self, name: str | None = None, *, idempotent: bool = True,
                lease: float | None = None, hedge: bool = False
                ) -> Callable[[Handler], Handler]:
        """Decorator registering ``func`` under ``name`` (default: its own name).

        ``idempotent=False`` marks a command that must not run twice (it charges a
        card, sends a mail): if its worker is lost mid-request, the broker answers
        with an error instead of sending it to another worker. ``lease`` (seconds):
        the job must show life (``ctx.progress``, ``ctx.heartbeat``) at least that
        often, or the broker takes it for hung and cancels it. ``hedge=True`` (for
        idempotent commands whose answer is worth two runs when one is slow): when this
        worker has not answered within the command's recent p95, the broker may send a
        copy to another worker and take the first answer.
        """

        def register(func: Handler) -> Handler:
            self.add(name or func.__name__, func, idempotent=idempotent, lease=lease,
                     hedge=hedge)
            return func

        return register

    def add(self, name: str, func: Handler, *, idempotent: bool = True,
            lease: float | None = None, hedge: bool = False) -> None:
        """Register (or replace) the handler for ``name``."""
        if lease is not None and not lease > 0:
            raise ValueError("lease must be a number of seconds above 0")
        if hedge and not idempotent:
            raise ValueError("only an idempotent command may be hedged (run twice)")
        streams = inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func)
        self._entries[name] = _Entry(func, inspect.signature(func),
                                     inspect.iscoroutinefunction(func)
                                     or inspect.isasyncgenfunction(func), idempotent,
                                     lease, streams, hedge)

    def leases(self) -> dict[str, float]:
        """The commands with a lease, as a worker announces them when it registers."""
        return {name: e.lease for name, e in sorted(self._entries.items())
                if e.lease is not None}

    def lease_of(self, name: str) -> float | None:
        entry = self._entries.get(name)
        return entry.lease if entry is not None else None

    def runs_on_loop(self, name: str) -> bool:
        """Whether the handler is async (cancelling its task stops it at its next await)."""
        entry = self._entries.get(name)
        return entry is not None and entry.is_async

    def hedged(self) -> list[str]:
        """Commands the broker may hedge, sorted."""
        return sorted(name for name, entry in self._entries.items() if entry.hedge)

    def not_idempotent(self) -> list[str]:
        """Commands that must never be retried on another worker, sorted."""
        return sorted(name for name, entry in self._entries.items() if not entry.idempotent)

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """Command names, sorted, as a worker announces them when it registers."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def only(self, names: set[str]) -> CommandRegistry:
        """A registry with just these of its commands."""
        other = CommandRegistry()
        other._entries = {n: e for n, e in self._entries.items() if n in names}
        return other

    def copy(self) -> CommandRegistry:
        """A registry that starts with these commands and can be changed on its own."""
        other = CommandRegistry()
        other._entries = dict(self._entries)
        return other

    async def run(self, name: str, params: dict[str, Any], ctx: Any = None) -> Any:
        """Run one command; raises :class:`CommandError` for anything the caller did wrong.

        ``ctx`` goes to a handler that declares a keyword-only ``ctx`` parameter.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownCommand(f"Unknown command '{name}'")
        if CONTEXT in params:
            raise BadParams(f"Bad parameters for '{name}': '{CONTEXT}' is not a parameter "
                            "a request may set")
        if entry.wants_context:
            params = {**params, CONTEXT: ctx}
        try:
            entry.signature.bind(**params)
        except TypeError as exc:
            raise BadParams(f"Bad parameters for '{name}': {exc}") from None
        if entry.streams:
            return await _stream(entry, params, ctx)
        if entry.is_async:
            return await entry.func(**params)
        result = await asyncio.to_thread(entry.func, **params)
        if inspect.isawaitable(result):  # a sync function that returned a coroutine
            result = await result
        return result


#: The registry that ``python -m workers`` serves unless told otherwise.
registry = CommandRegistry()

#: Shorthand: ``@command()`` registers into :data:`registry`.
command = registry.command


async def _stream(entry: _Entry, params: dict[str, Any], ctx: Any) -> Any:
    """Run a generator handler: each item goes as a chunk to a requester that asked
    (the answer's data is then None), or is collected into the answer's data."""
    streaming = getattr(ctx, "stream", False)
    collected: list[Any] = []

    async def emit(item: Any) -> None:
        if streaming:
            await ctx.send_chunk(item)
        else:
            collected.append(item)

    if entry.is_async:
        async for item in entry.func(**params):
            await emit(item)
    else:  # a plain generator runs in a thread; each item is handed to the loop
        generator = entry.func(**params)
        end = object()
        while (item := await asyncio.to_thread(next, generator, end)) is not end:
            await emit(item)
    return None if streaming else collected


class Outcome(NamedTuple):
    """What running a command came to: the fields of a ``response`` frame."""

    ok: bool
    data: Any = None
    error: str | None = None
    code: ErrorCode | None = None


async def run_safely(reg: CommandRegistry, name: str, params: dict[str, Any],
                     ctx: Any = None) -> Outcome:
    """Run a command and fold any failure into an :class:`Outcome`, with its code."""
    try:
        return Outcome(True, await reg.run(name, params, ctx))
    except CommandError as exc:
        return Outcome(False, None, str(exc), exc.code)
    # A handler bug must never kill its worker; sys.exit() in a handler is one too.
    except (Exception, SystemExit) as exc:
        return Outcome(False, None, f"{type(exc).__name__}: {exc}", ErrorCode.HANDLER_FAILED)


__all__ = ["BadParams", "CommandError", "CommandRegistry", "Handler", "Outcome",
           "UnknownCommand", "command", "registry", "run_safely", "Awaitable"]
