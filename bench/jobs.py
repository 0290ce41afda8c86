"""The bench's long job: ``python -m workers ... --handlers bench.jobs``."""

import asyncio

from workers.handlers import command
from workers.jobs import JobContext


@command()
async def tick(ms: float = 200.0, every_ms: float = 10.0, *, ctx: JobContext) -> int:
    """Runs ``ms``, reporting progress every ``every_ms``; returns how many it reported."""
    steps = max(1, int(ms / every_ms))
    for step in range(steps):
        await asyncio.sleep(every_ms / 1000)
        await ctx.progress((step + 1) / steps)
    return steps
