"""Built-in commands of every worker, as in the seed."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
from typing import Any

from .handlers import CommandError, command

_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


def now_text() -> str:
    """Local time in the seed's format, ``YYYY-MM-DD HH:MM:SS``."""
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def calculate_value(a: Any, b: Any, op: str = "+") -> float | int:
    """Apply one arithmetic operator; the broker's server action uses this too."""
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CommandError(f"'{name}' must be a number")
    if op not in _OPS:
        raise CommandError(f"Unknown operator '{op}' (use one of + - * /)")
    if op == "/" and b == 0:
        raise CommandError("Division by zero")
    return _OPS[op](a, b)


@command()
async def get_time() -> str:
    """The worker's local time."""
    return now_text()


@command()
async def echo(message: Any = "") -> str:
    """Answers "Echo: <message>"."""
    return f"Echo: {message}"


@command()
async def calculate(a: Any = None, b: Any = None, op: str = "+") -> float | int:
    """a op b, for op in + - * /."""
    return calculate_value(a, b, op)


@command()
async def get_system_info() -> dict[str, Any]:
    """What machine this worker runs on."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "pid": os.getpid(),
    }


@command()
async def execute_command(command: str = "") -> dict[str, Any]:
    """Say what would have been run, and run nothing: a remote shell is not a feature."""
    return {"command": command, "executed": False,
            "output": f"Would execute: {command}" if command else "No command given"}
