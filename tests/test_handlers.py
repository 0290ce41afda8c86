"""The command registry and the built-in commands, without sockets."""

from __future__ import annotations

import asyncio
import re
import sys
import threading

import pytest

from workers import builtin, handlers
from workers.handlers import CommandError, CommandRegistry, run_safely
from workers.protocol import ErrorCode


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
