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
handler raises becomes an error answer; the worker itself stays up. A worker
announces each command's parameters and docstring when it registers
(:func:`schema_of`), so that ``manage.py describe`` can show what the fleet offers.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, NamedTuple

from .protocol import (MAX_SCHEMA_CHARS, MAX_SCHEMAS_BYTES, ErrorCode, SchemaError, dumps,
                       parse_schema)

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

logger = logging.getLogger("workers.client")


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

    def schemas(self) -> dict[str, dict[str, Any]]:
        """What each command takes and does (:func:`schema_of`), as a worker announces it
        when it registers, for the broker's ``describe``.

        Only schemas the broker will keep are sent: one that breaks its limits (more
        than MAX_PARAMS parameters), or that would take the whole over
        MAX_SCHEMAS_BYTES, is left out and its command goes undescribed.
        """
        out: dict[str, dict[str, Any]] = {}
        size, left_out = 2, []  # 2: the braces
        for name, entry in sorted(self._entries.items()):
            schema = schema_of(entry.func, entry.signature, streams=entry.streams)
            try:
                parse_schema(schema)
            except SchemaError:
                left_out.append(name)
                continue
            # name, colon, schema, and a comma before all but the first
            more = len(dumps(name).encode()) + 1 + len(dumps(schema).encode()) + bool(out)
            if size + more > MAX_SCHEMAS_BYTES:
                left_out.append(name)
                continue
            out[name] = schema
            size += more
        if left_out:
            logger.warning("Schemas of %d commands left out of the registration (more than "
                           "the broker keeps): %s%s", len(left_out), ", ".join(left_out[:20]),
                           " ..." if len(left_out) > 20 else "")
        return out

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


# --------------------------------------------------------------------------- schemas


def schema_of(func: Handler, signature: inspect.Signature | None = None, *,
              streams: bool = False) -> dict[str, Any]:
    """A handler's schema (:func:`workers.protocol.parse_schema`'s form), from its
    signature: what a requester's ``data`` may hold, and the docstring's first line.

    ``ctx`` is left out (no request may set it), and so are positional-only and
    ``*args`` parameters: a request's data arrive as keywords and never reach them.
    ``**kwargs`` makes it ``"extra"``. Annotations never make it fail: what cannot be
    evaluated is shown as written.
    """
    signature = signature or inspect.signature(func)
    hints = _hints(func)
    params: list[dict[str, Any]] = []
    schema: dict[str, Any] = {"params": params}
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            schema["extra"] = True
        if p.name == CONTEXT or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL,
                                           p.VAR_KEYWORD):
            continue
        param: dict[str, Any] = {"name": _fit(p.name)}
        if p.annotation is not p.empty:
            param["type"] = _fit(type_name(hints.get(p.name, p.annotation)))
        param["required"] = p.default is p.empty
        if p.default is not p.empty:
            param.update(_default(p.default))
        params.append(param)
    returns = hints.get("return", signature.return_annotation)
    if returns is not signature.empty:
        schema["returns"] = _fit(type_name(returns))
    doc = _first_line(func)
    if doc:
        schema["doc"] = doc
    if streams:
        schema["stream"] = True
    return schema


def type_name(annotation: Any) -> str:
    """A short name for an annotation, as one would write it: ``int``, ``list[int]``,
    ``float | None``, ``Literal['a', 'b']``; its repr for anything else."""
    try:
        return _type_name(annotation)
    except Exception:  # an odd annotation must not keep a worker from registering
        return _safe_repr(annotation)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):  # not evaluated: as written, without its quotes
        quoted = len(annotation) > 1 and annotation[0] == annotation[-1] in "'\""
        return annotation[1:-1] if quoted else annotation
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    if isinstance(annotation, list):  # Callable[[int, str], ...]'s arguments
        return f"[{', '.join(map(_type_name, annotation))}]"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(map(_type_name, args))
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        name = _type_name(origin)
        return f"{name}[{', '.join(map(_type_name, args))}]" if args else name
    if isinstance(annotation, (type, typing.TypeVar, typing.NewType, typing.ParamSpec)):
        return annotation.__name__
    return _safe_repr(annotation).removeprefix("typing.")


def _hints(func: Handler) -> dict[str, Any]:
    """Evaluated annotations, or {} when they cannot be (a name defined nowhere, a
    callable object get_type_hints does not take): the signature's are shown then."""
    try:
        return typing.get_type_hints(func)
    except Exception:
        return {}


def _default(value: Any) -> dict[str, Any]:
    """``{"default": value}`` when it is short JSON that reads back as itself, else
    ``{"default_repr": ...}`` (a date, an object, a long list)."""
    try:
        if _plain(value) and len(dumps(value)) <= MAX_SCHEMA_CHARS:
            return {"default": value}
    except (RecursionError, ValueError):  # a list that holds itself, a 5,000-digit int
        pass
    return {"default_repr": _fit(_safe_repr(value))}


def _plain(value: Any) -> bool:
    """Made of JSON's own types only (a tuple or an enum would read back as another,
    infinity as null)."""
    if type(value) is list:
        return all(map(_plain, value))
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if type(value) is float:
        return math.isfinite(value)
    return value is None or type(value) in (str, int, bool)


def _first_line(func: Handler) -> str:
    while isinstance(func, functools.partial):  # its own doc is partial's
        func = func.func
    doc = inspect.getdoc(func) or ""
    lines = doc.strip().splitlines()
    return _fit(lines[0].strip()) if lines else ""


def _fit(text: str) -> str:
    """Printable (what is not, escaped as repr escapes it) and at most MAX_SCHEMA_CHARS."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= MAX_SCHEMA_CHARS else text[:MAX_SCHEMA_CHARS - 3] + "..."


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


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
           "UnknownCommand", "command", "registry", "run_safely", "schema_of", "type_name",
           "Awaitable"]
