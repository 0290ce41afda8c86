"""The command registry and the built-in commands, without sockets."""

from __future__ import annotations

import asyncio
import datetime
import functools
import math
import re
import sys
import threading
from typing import Any, Callable, Literal, Optional

import pytest

from workers import builtin, handlers, protocol
from workers.handlers import CommandError, CommandRegistry, run_safely
from workers.protocol import MAX_PARAMS, MAX_SCHEMAS_BYTES, ErrorCode


@pytest.fixture
def reg() -> CommandRegistry:
    return CommandRegistry()


async def test_decorated_functions_register_under_their_name_or_a_given_one(
        reg: CommandRegistry) -> None:
    @reg.command()
    async def add(a: int, b: int) -> int:
        return a + b

    @reg.command("shout")
    def loud(text: str) -> str:
        return text.upper()

    assert reg.names() == ["add", "shout"]
    assert "add" in reg and "loud" not in reg
    assert await reg.run("add", {"a": 2, "b": 3}) == 5
    assert await reg.run("shout", {"text": "hi"}) == "HI"


async def test_sync_handlers_run_off_the_event_loop(reg: CommandRegistry) -> None:
    """A blocking handler must not stall the loop (and with it heartbeats and other work)."""
    release = threading.Event()

    @reg.command()
    def block() -> str:
        release.wait(2)
        return threading.current_thread().name

    task = asyncio.create_task(reg.run("block", {}))
    await asyncio.sleep(0.05)
    assert not task.done()  # the loop is free while the handler blocks
    release.set()
    thread_name = await asyncio.wait_for(task, 2)
    assert thread_name != threading.current_thread().name


async def test_sync_handler_returning_a_coroutine_is_awaited(reg: CommandRegistry) -> None:
    async def later() -> str:
        return "done"

    reg.add("lazy", lambda: later())
    assert await reg.run("lazy", {}) == "done"


@pytest.mark.parametrize("params, reason", [
    ({"a": 1}, "Bad parameters for 'add': missing a required argument: 'b'"),
    ({"a": 1, "b": 2, "c": 3}, "Bad parameters for 'add': got an unexpected keyword"),
])
async def test_bad_parameters_are_the_callers_fault(reg: CommandRegistry, params: dict,
                                                    reason: str) -> None:
    reg.add("add", lambda a, b: a + b)
    with pytest.raises(CommandError, match=re.escape(reason)):
        await reg.run("add", params)


async def test_unknown_command(reg: CommandRegistry) -> None:
    assert await run_safely(reg, "nope", {}) == (False, None, "Unknown command 'nope'",
                                                ErrorCode.UNKNOWN_COMMAND)


async def test_run_safely_folds_every_failure_into_an_answer(reg: CommandRegistry) -> None:
    @reg.command()
    async def fail() -> None:
        raise RuntimeError("disk on fire")

    @reg.command()
    def refuse() -> None:
        raise CommandError("not today")

    @reg.command()
    def leave() -> None:
        sys.exit(3)

    assert await run_safely(reg, "fail", {}) == (False, None, "RuntimeError: disk on fire",
                                                ErrorCode.HANDLER_FAILED)
    assert await run_safely(reg, "refuse", {}) == (False, None, "not today",
                                                  ErrorCode.COMMAND_ERROR)
    assert await run_safely(reg, "leave", {}) == (False, None, "SystemExit: 3",
                                                 ErrorCode.HANDLER_FAILED)


async def test_copy_is_independent(reg: CommandRegistry) -> None:
    reg.add("a", lambda: 1)
    other = reg.copy()
    other.add("b", lambda: 2)
    other.remove("a")
    assert reg.names() == ["a"] and other.names() == ["b"]


# --------------------------------------------------------------------------- built-ins


def test_builtins_are_in_the_default_registry() -> None:
    assert {"get_time", "echo", "calculate", "get_system_info", "execute_command"} <= set(
        handlers.registry.names())


async def test_seed_examples() -> None:
    reg = handlers.registry
    assert await run_safely(reg, "echo", {"message": "Hello World"}) == (
        True, "Echo: Hello World", None, None)
    assert await run_safely(reg, "calculate", {"a": 10, "b": 20, "op": "+"}) == (True, 30, None, None)
    ok, now, *_ = await run_safely(reg, "get_time", {})
    assert ok and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", now)


@pytest.mark.parametrize("params, result", [
    ({"a": 7, "b": 2, "op": "-"}, 5),
    ({"a": 7, "b": 2, "op": "*"}, 14),
    ({"a": 7, "b": 2, "op": "/"}, 3.5),
    ({"a": 1.5, "b": 2}, 3.5),
])
async def test_calculate(params: dict, result: float) -> None:
    assert await run_safely(handlers.registry, "calculate", params) == (True, result, None,
                                                                        None)


@pytest.mark.parametrize("params, error", [
    ({"a": 1, "b": 0, "op": "/"}, "Division by zero"),
    ({"a": 1, "b": 2, "op": "%"}, "Unknown operator '%' (use one of + - * /)"),
    ({"a": "1", "b": 2}, "'a' must be a number"),
    ({"a": True, "b": 2}, "'a' must be a number"),
    ({"a": 1}, "'b' must be a number"),
])
async def test_calculate_refuses_nonsense(params: dict, error: str) -> None:
    assert await run_safely(handlers.registry, "calculate", params) == (
        False, None, error, ErrorCode.COMMAND_ERROR)


async def test_system_info_and_execute_command_run_nothing() -> None:
    info = await builtin.get_system_info()
    assert {"hostname", "platform", "python", "cpu_count", "pid"} <= set(info)
    result = await builtin.execute_command("rm -rf /")
    assert result == {"command": "rm -rf /", "executed": False,
                      "output": "Would execute: rm -rf /"}


# --------------------------------------------------------------------------- schemas


def test_a_schema_comes_from_the_signature_and_the_docstrings_first_line(
        reg: CommandRegistry) -> None:
    @reg.command()
    async def resize(url: str, width: int = 640, *, fmt: str = "png") -> dict:
        """Resize the image at url.

        Only the first line is sent."""
        return {}

    assert reg.schemas() == {"resize": {
        "params": [{"name": "url", "type": "str", "required": True},
                   {"name": "width", "type": "int", "required": False, "default": 640},
                   {"name": "fmt", "type": "str", "required": False, "default": "png"}],
        "returns": "dict", "doc": "Resize the image at url."}}


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_types_and_defaults_of_every_kind(reg: CommandRegistry) -> None:
    @reg.command()
    def typed(hidden: int = 0, /, a: list[int] = [], b: float | None = None,  # noqa: B006
              c: Optional[int] = 3, d: Literal["x", "y"] = "x",
              e: Callable[[int], str] = str, f: tuple[int, ...] = (1, 2),
              g: dict[str, Any] = {"k": [1]}, h: Unprintable = Unprintable(),  # noqa: B006
              i=datetime.date(2020, 1, 1), j: float = math.inf, k: str = "x" * 300,
              *args: int, ctx: Any = None, **more: Any) -> None:
        pass

    schema = reg.schemas()["typed"]
    assert schema["params"][:10] == [
        {"name": "a", "type": "list[int]", "required": False, "default": []},
        {"name": "b", "type": "float | None", "required": False, "default": None},
        {"name": "c", "type": "int | None", "required": False, "default": 3},
        {"name": "d", "type": "Literal['x', 'y']", "required": False, "default": "x"},
        {"name": "e", "type": "Callable[[int], str]", "required": False,
         "default_repr": "<class 'str'>"},
        {"name": "f", "type": "tuple[int, ...]", "required": False, "default_repr": "(1, 2)"},
        {"name": "g", "type": "dict[str, Any]", "required": False, "default": {"k": [1]}},
        {"name": "h", "type": "Unprintable", "required": False,
         "default_repr": "<Unprintable>"},
        {"name": "i", "required": False, "default_repr": "datetime.date(2020, 1, 1)"},
        {"name": "j", "type": "float", "required": False, "default_repr": "inf"},
    ]
    # A default too long for JSON is shown as its repr, cut. No request can reach a
    # positional-only parameter, *args or ctx: not listed; **kwargs takes any others.
    [long] = schema["params"][10:]
    assert long["default_repr"].endswith("...") and len(long["default_repr"]) == 200
    assert schema["extra"] is True and schema["returns"] == "None" and "doc" not in schema


def test_annotations_that_cannot_be_evaluated_are_shown_as_written(
        reg: CommandRegistry) -> None:
    namespace: dict[str, Any] = {}
    exec("from __future__ import annotations\n"
         "def later(item: Undefined, size: 'int | None' = None) -> list[Undefined]:\n"
         "    'First\\x1b line: an escape sequence, escaped.'\n", namespace)
    reg.add("later", namespace["later"])

    class Resizer:
        """Resizes, as a callable object."""

        def __call__(self, url: str, width: "int | None" = 1) -> None: ...

    reg.add("resizer", Resizer())
    reg.add("partial", functools.partial(lambda a, b: a + b, b=1))
    got = reg.schemas()
    assert got["later"] == {
        "params": [{"name": "item", "type": "Undefined", "required": True},
                   {"name": "size", "type": "int | None", "required": False,
                    "default": None}],
        "returns": "list[Undefined]", "doc": "First\\x1b line: an escape sequence, escaped."}
    assert got["resizer"]["params"] == [
        {"name": "url", "type": "str", "required": True},
        {"name": "width", "type": "int | None", "required": False, "default": 1}]
    assert got["resizer"]["doc"] == "Resizes, as a callable object."
    assert got["partial"] == {"params": [{"name": "a", "required": True},
                                         {"name": "b", "required": False, "default": 1}]}


def test_a_generator_handler_streams(reg: CommandRegistry) -> None:
    @reg.command()
    async def frames(url: str):
        yield url

    assert reg.schemas()["frames"] == {
        "params": [{"name": "url", "type": "str", "required": True}], "stream": True}


def test_only_schemas_the_broker_keeps_are_sent(reg: CommandRegistry,
                                                caplog: pytest.LogCaptureFixture) -> None:
    namespace: dict[str, Any] = {}
    exec(f"def wide({', '.join(f'p{i}: int = 0' for i in range(MAX_PARAMS + 1))}): pass",
         namespace)
    reg.add("a_wide", namespace["wide"])
    for i in range(200):  # some 400 bytes each
        exec(f"def c{i:03}(value: str = {'v' * 150!r}):\n    {'d' * 150!r}\n", namespace)
        reg.add(f"c{i:03}", namespace[f"c{i:03}"])
    sent = reg.schemas()
    assert "a_wide" not in sent and 0 < len(sent) < 200  # beyond the bytes: left out
    assert len(protocol.dumps(sent).encode()) <= MAX_SCHEMAS_BYTES
    kept, dropped = protocol.parse_schemas(sent, reg.names())
    assert (kept, dropped) == (sent, [])  # the broker keeps all that was sent
    assert f"Schemas of {201 - len(sent)} commands left out" in caplog.text
    assert "broker keeps): a_wide, c" in caplog.text


def test_the_builtin_commands_describe_themselves() -> None:
    schemas = handlers.registry.schemas()
    assert schemas["calculate"]["params"] == [
        {"name": "a", "type": "Any", "required": False, "default": None},
        {"name": "b", "type": "Any", "required": False, "default": None},
        {"name": "op", "type": "str", "required": False, "default": "+"}]
    assert schemas["get_time"] == {"params": [], "returns": "str",
                                   "doc": "The worker's local time."}
