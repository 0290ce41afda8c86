"""A user's own commands, loaded by `python -m workers ... --handlers tests.sample_handlers`."""

import os
import time

import asyncio

from workers.handlers import command


@command()
async def slow(seconds: float = 1.0, tag: str = "") -> dict:
    """Takes a while: lets tests catch requests in flight."""
    await asyncio.sleep(seconds)
    return {"tag": tag, "pid": os.getpid()}


@command()
def blocking(seconds: float = 0.2) -> str:
    """A plain function that blocks; it must run off the worker's event loop."""
    time.sleep(seconds)
    return f"slept {seconds}"


@command()
async def explode() -> None:
    raise RuntimeError("kaboom")


@command()
def whoami() -> int:
    return os.getpid()


@command(idempotent=False)
async def charge(seconds: float = 1.0) -> str:
    """Must never run twice: if its worker dies, the broker must not retry it."""
    await asyncio.sleep(seconds)
    return "charged"
