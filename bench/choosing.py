"""What choosing a worker costs as the fleet grows: ``python -m bench.choosing``.

Reserve-and-release of one slot, timed in-process on both registries, with 10,
1,000 and 10,000 workers offering the command: ``least_loaded`` (power of two choices
over a sample of 8) beside ``round_robin`` (which must look at every worker), and
requests with a label selector or an affinity key (which must too). The Redis rows need Redis
(``REDIS_URL``, default 127.0.0.1:6379, database 15); they use keys of their own
prefix and delete those, and nothing else, when done; without Redis they are
reported as n/a. Prints a table and writes ``bench/results/choosing.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
django.setup()

from django.test import override_settings  # noqa: E402

from dispatch.balancing import Health, Wanted  # noqa: E402
from dispatch.registry import Registry, WorkerEntry  # noqa: E402
from dispatch.registry.memory import MemoryRegistry  # noqa: E402

SIZES = (10, 1_000, 10_000)
CASES: dict[str, tuple[str, Wanted]] = {
    "least_loaded": ("least_loaded", Wanted("echo")),
    "round_robin": ("round_robin", Wanted("echo")),
    "selector": ("least_loaded", Wanted("echo", select=(("zone", "a"),))),
    "affinity": ("least_loaded", Wanted("echo", affinity="user-42")),
}


def entries(n: int) -> list[WorkerEntry]:
    return [WorkerEntry(f"w{i}", f"w{i}", f"worker.{i}", frozenset({"echo"}),
                        max_concurrency=4, labels={"zone": "ab"[i % 2]}) for i in range(n)]


async def time_case(registry: Registry, wanted: Wanted, seconds: float) -> float:
    """Microseconds per reserve + release, over about ``seconds`` (after one untimed:
    an affinity ring is built on first use)."""
    reservation = (await registry.reserve_many([wanted]))[0]
    await registry.release(reservation.worker.worker_id, latency_ms=1.0,  # type: ignore
                           health=Health.OK)
    done, stop = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop:
        for _ in range(20):
            reservation = (await registry.reserve_many([wanted]))[0]
            assert reservation.worker is not None
            await registry.release(reservation.worker.worker_id, latency_ms=1.0, health=Health.OK)
        done += 20
    return (time.perf_counter() - started) / done * 1e6


async def measure(kind: str, seconds: float) -> dict[str, dict[int, float | None]]:
    out: dict[str, dict[int, float | None]] = {case: {} for case in CASES}
    for n in SIZES:
        registry = await make(kind)
        if registry is None:
            return {case: {n: None for n in SIZES} for case in CASES}
        for entry in entries(n):
            await registry.add(entry)
        for case, (strategy, wanted) in CASES.items():
            with override_settings(BROKER={"STRATEGY": strategy}):
                out[case][n] = await time_case(registry, wanted, seconds)
        await close(registry)
    return out


async def make(kind: str) -> Registry | None:
    if kind == "memory":
        return MemoryRegistry()
    from dispatch.registry.redis import RedisRegistry

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    registry = RedisRegistry(url, prefix=f"bench-choosing-{secrets.token_hex(6)}", ttl=600.0)
    try:
        await registry._client().ping()  # noqa: SLF001 - a bench may reach in
    except Exception as exc:  # noqa: BLE001 - no Redis here: reported, not fatal
        print(f"redis: n/a ({exc})", file=sys.stderr)
        return None
    return registry


async def close(registry: Registry) -> None:
    """Delete the keys this run made (its prefix's), and only those."""
    prefix = getattr(registry, "prefix", None)
    if prefix is not None:
        client = registry._client()  # type: ignore[attr-defined]  # noqa: SLF001
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start:start + 1000])
    closer = getattr(registry, "close", None)
    if closer is not None:
        await closer()


def table(results: dict[str, dict[str, dict[int, float | None]]]) -> str:
    head = "| registry | case | " + " | ".join(f"{n:,} workers" for n in SIZES) + \
        f" | {SIZES[-1]:,} / {SIZES[0]} |"
    lines = [head, "|" + " --- |" * (len(SIZES) + 3)]
    for kind, cases in results.items():
        for case, by_size in cases.items():
            cells = [f"{v:,.1f} µs" if v is not None else "n/a" for v in by_size.values()]
            first, last = by_size[SIZES[0]], by_size[SIZES[-1]]
            ratio = f"{last / first:.1f}x" if first and last else "n/a"
            lines.append(f"| {kind} | {case} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.choosing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per case and size (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "choosing.md"),
                        help="where to write the table (default bench/results/choosing.md)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for kind in ("memory", "redis"):
        print(f"{kind}: timing {', '.join(CASES)} at {', '.join(map(str, SIZES))} workers ...",
              file=sys.stderr)
        results[kind] = asyncio.run(measure(kind, args.seconds))
    text = table(results)
    print(text)
    Path(args.out).write_text("# Choosing a worker: reserve + release, per request\n\n"
                              f"{text}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
