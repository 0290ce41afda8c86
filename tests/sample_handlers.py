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


# ---------------------------------------------------------------------------- long jobs

from pathlib import Path  # noqa: E402

from workers.jobs import JobContext  # noqa: E402


@command()
async def long_job(seconds: float = 5.0, *, ctx: JobContext) -> str:
    """Reports progress ten times a second; stops at once when cancelled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (done := loop.time() - started) < seconds:
        await ctx.progress(done / seconds, f"{done:.1f}s of {seconds:g}s")
        await asyncio.sleep(0.1)
    return "finished"


@command()
def careful(seconds: float = 5.0, marker: str = "", *, ctx: JobContext) -> str:
    """A thread cannot be interrupted: it looks at ctx.cancelled, and says what it saw."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            Path(marker).write_text(f"cancelled: {ctx.cancel_reason}")
            return "stopped early"
        ctx.progress(message="working")
        time.sleep(0.05)
    return "finished"


@command()
async def count(n: int = 5, size: int = 0, log: str = "", *, ctx: JobContext):
    """Streams n chunks (each ``size`` bytes of padding); notes each one it produced."""
    for i in range(n):
        if log:
            Path(log).write_text(str(i))
        yield {"i": i, "pad": "x" * size}
        await asyncio.sleep(0)


@command()
async def time_left(*, ctx: JobContext) -> float | None:
    return ctx.time_left()


@command(lease=1.0)
async def hangs(seconds: float = 30.0) -> str:
    """Leased for 1 s, and shows no life: the broker must take it for hung."""
    await asyncio.sleep(seconds)
    return "woke up"


@command(lease=1.0)
async def beating(seconds: float = 2.5, *, ctx: JobContext) -> str:
    """Leased for 1 s, and says it lives: it may run longer than its lease."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < seconds:
        await ctx.heartbeat()
        await asyncio.sleep(0.3)
    return "alive"


@command()
def poison() -> None:
    """Kills its worker: a request whose every worker dies under it."""
    os._exit(17)


@command()
async def sleep_ms(ms: float = 20.0) -> float:
    await asyncio.sleep(ms / 1000)
    return ms


# ---------------------------------------------------------------------------- routing


@command()
async def nap(ms: float = 4.0) -> str:
    """Sleeps ``ms`` (times $NAP_FACTOR on a worker made slow): the balance tests."""
    await asyncio.sleep(ms * float(os.environ.get("NAP_FACTOR", "1")) / 1000)
    return os.environ.get("WORKER_TAG", "")


@command(hedge=True)
async def lookup(ms: float = 5.0, slow_on: str = "") -> str:
    """Idempotent and hedgeable: slow (3 s) only on the worker tagged ``slow_on``."""
    tag = os.environ.get("WORKER_TAG", "")
    await asyncio.sleep(3.0 if slow_on and tag == slow_on else ms / 1000)
    return tag


# ---------------------------------------------------------------------------- tracing


@command()
async def trace_seen(*, ctx: JobContext) -> str | None:
    """The trace context the worker was given with the request."""
    return ctx.traceparent


# ---------------------------------------------------------------------------- durability


def _note(runs: str, line: str) -> None:
    if runs:
        with open(runs, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@command()
async def job(seconds: float = 1.0, tag: str = "", runs: str = "") -> str:
    """Notes each start and end in the file ``runs``: tests count how often it ran."""
    _note(runs, f"start {tag}")
    await asyncio.sleep(seconds)
    _note(runs, f"end {tag}")
    return f"done {tag}"


@command(idempotent=False)
async def job_once(seconds: float = 1.0, tag: str = "", runs: str = "") -> str:
    """As ``job``, for a command that must never run twice."""
    _note(runs, f"start {tag}")
    await asyncio.sleep(seconds)
    _note(runs, f"end {tag}")
    return f"done {tag}"
