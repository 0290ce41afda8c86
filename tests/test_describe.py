"""``manage.py describe`` and ``GET /api/commands``: what the fleet offers, as its
workers described their commands at registration."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from typing import Any

import pytest

from dispatch import registry as registry_module
from dispatch.control import services
from dispatch.management.commands.describe import Command, format_command, format_commands
from dispatch.registry import WorkerEntry
from tests.procs import Broker
from workers.requester import SyncRequester

RESIZE = {"params": [{"name": "url", "type": "str", "required": True},
                     {"name": "width", "type": "int", "required": False, "default": 640},
                     {"name": "fmt", "type": "str", "required": False, "default": "png"}],
          "returns": "dict", "doc": "Resize the image at url to width pixels."}


def command(name: str, *workers: str, schema: dict[str, Any] | None = None,
            differ: bool = False) -> dict[str, Any]:
    """One command as GET /api/commands lists it."""
    return {"command": name, "workers": [{"worker_id": f"id-{w}", "name": w} for w in workers],
            "count": len(workers), "schema": schema, "schemas_differ": differ, "stats": {}}


def test_the_table_lists_each_command_its_workers_params_and_doc() -> None:
    table = format_commands([
        command("resize", "gpu-1", "gpu-2", "gpu-3", "gpu-4", schema=RESIZE, differ=True),
        command("legacy", "old"),
        command("wild", "w", schema={"params": [], "extra": True}),
    ])
    header, resize, legacy, wild, note = table.splitlines()
    assert header.split() == ["COMMAND", "WORKERS", "PARAMS", "DOC"]
    assert resize.startswith("resize*  4 (gpu-1, gpu-2, gpu-3, +1)  "
                             'url: str, width: int = 640, fmt: str = "png"  Resize the image')
    assert legacy.split() == ["legacy", "1", "(old)", "?"]
    assert wild.split() == ["wild", "1", "(w)", "**kwargs"]
    assert header.index("PARAMS") == resize.index("url") == legacy.index("?")
    assert note.startswith("* its workers sent different schemas")
    assert format_commands([]) == "No commands offered: no workers online."


def test_the_detail_of_one_command() -> None:
    frames = {"params": [{"name": "url", "type": "str", "required": True},
                         {"name": "at", "required": False, "default_repr": "date(2020, 1, 1)"}],
              "returns": "AsyncIterator[bytes]", "stream": True, "extra": True,
              "doc": "Stream the frames."}
    detail = {**command("frames", "gpu-1", schema=frames), "stats": {"requests": 3}}
    assert format_command(detail).splitlines() == [
        "frames: Stream the frames.",
        "  workers (1): gpu-1 (id-gpu-1)",
        "  parameters:",
        "    url: str  (required)",
        "    at = date(2020, 1, 1)",
        "    **kwargs: it takes any others too",
        "  returns: AsyncIterator[bytes]",
        "  streams: yes (partial results as chunks)",
        "  requests: 3",
    ]
    assert format_command(command("legacy", "old", differ=True)).splitlines()[2:] == [
        "  parameters: unknown (its workers sent no schema)",
        "  note: its workers sent different schemas: shown is the one most of them sent"]


def test_a_workers_text_cannot_take_over_the_terminal() -> None:
    hostile = command("x\x1b[2J", "name\n\u2028forged", schema={"params": [
        {"name": "p", "required": False, "default": "\x1b]0;title\x07\u0085"}]})
    out = format_commands([hostile]) + format_command(hostile)
    assert not any(c in out for c in "\x1b\x07\u0085\u2028")
    assert "x\\x1b[2J" in out and "name\\n\\u2028forged" in out


def test_help_says_what_it_shows() -> None:
    text = Command().create_parser("manage.py", "describe").format_help()
    assert "(name: type = default)" in text and "--json" in text and "COMMAND" in text


def test_a_real_workers_schemas_reach_the_api_and_describe(shared_broker: Broker,
                                                           spawn_worker) -> None:
    broker = shared_broker  # 'resize' and 'frames' are offered by this test's worker only
    spawn_worker("describer", "--handlers", "tests.described_handlers")
    with SyncRequester(broker.requester_url) as requester:
        assert requester.request("resize", {"url": "a.png"}).success
    found = broker.get("/api/commands")["commands"]
    names = [c["command"] for c in found]
    assert names == sorted(names) and {"resize", "frames", "echo", "get_time"} <= set(names)
    [resize] = [c for c in found if c["command"] == "resize"]
    assert resize["schema"] == RESIZE
    assert (resize["count"], resize["schemas_differ"]) == (1, False)
    assert (resize["stats"]["answered"], resize["stats"]["failed"]) == (1, 0)
    assert resize["stats"]["p50_ms"] > 0
    assert [w["name"] for w in resize["workers"]] == ["describer"]
    [frames] = broker.get("/api/commands?command=frames")["commands"]
    assert frames["schema"]["stream"] is True
    assert frames["schema"]["params"][1] == {"name": "every", "type": "float | None",
                                             "required": False, "default": None}
    with pytest.raises(urllib.error.HTTPError) as unknown:
        broker.get("/api/commands?command=nothing")
    assert unknown.value.code == 404

    as_json, table, detail = broker.manage_many(["describe", "--json"], ["describe"],
                                                ["describe", "frames"])
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"commands": found}
    [row] = [line for line in table.stdout.splitlines() if line.startswith("resize ")]
    assert row.split(None, 3)[1:3] == ["1", "(describer)"]
    assert row.endswith('url: str, width: int = 640, fmt: str = "png"  '
                        "Resize the image at url to width pixels.")
    assert detail.stdout.splitlines()[0] == "frames: Stream the frames of a video."
    assert "    every: float | None = null" in detail.stdout


async def test_describing_a_big_fleet_does_not_stall_the_event_loop() -> None:
    """1,000 workers with 20 KB of distinct schemas each: the loop keeps ticking."""
    registry_module.reset_registry()
    registry = registry_module.get_registry()
    commands = [f"c{i}" for i in range(20)]
    for w in range(1000):
        schema = {"params": [{"name": f"p{j}", "type": "str", "required": True}
                             for j in range(20)], "doc": f"w{w} " + "x" * 150}
        await registry.add(WorkerEntry(f"w{w}", f"w{w}", f"worker.{w}", frozenset(commands),
                                       schemas=json.dumps({c: schema for c in commands})))
    # Each tick's gap in this process's CPU time: what held the loop up (our code, on the
    # loop or holding the GIL, burns CPU meanwhile), not the wall-clock time another
    # program on a loaded machine took from it.
    gaps: list[float] = []
    wall: list[float] = []

    async def tick() -> None:
        last, last_wall = time.process_time(), time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(time.process_time() - last)
            wall.append(time.monotonic() - last_wall)
            last, last_wall = time.process_time(), time.monotonic()

    ticker = asyncio.ensure_future(tick())
    try:
        described = await services.describe()
    finally:
        ticker.cancel()
        registry_module.reset_registry()
    assert [c["count"] for c in described["commands"]] == [1000] * 20
    assert described["commands"][0]["schemas_differ"] is True
    assert max(gaps) < 0.25, (f"the loop stalled {max(gaps):.2f} s of CPU "
                              f"({max(wall):.2f} s of wall-clock time)")
