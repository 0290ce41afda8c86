"""Handlers with typed parameters, for the describe tests
(``python -m workers ... --handlers tests.described_handlers``)."""

from __future__ import annotations

from typing import AsyncIterator

from workers.handlers import command


@command()
async def resize(url: str, width: int = 640, *, fmt: str = "png") -> dict:
    """Resize the image at url to width pixels.

    Only the first line of a docstring is sent."""
    return {"url": url, "width": width, "fmt": fmt}


@command()
async def frames(url: str, every: float | None = None) -> AsyncIterator[bytes]:
    """Stream the frames of a video."""
    yield url.encode()
