"""What a streamed request costs the broker: ``python -m bench.streaming``.

One embedded broker (daphne), one real worker (``python -m workers``) serving
``bench.jobs``, and one requester keeping ``--inflight`` calls of a job that runs
``--job-ms`` and reports progress every ``--every-ms``. Each round runs the same
jobs once without asking for progress and once streaming it (``call(...,
on_progress=...)``), and measures the broker's CPU per request and per progress
event delivered. Prints a table and writes ``bench/results/streaming.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.common import ROOT, Proc, free_port, python, tree_cpu_seconds, wait_until
from workers.requester import Requester


async def load(url: str, inflight: int, seconds: float, job_ms: float, every_ms: float,
               stream: bool) -> tuple[int, int]:
    """Calls completed and progress events received in ``seconds``."""
    events = 0

    def seen(_: object) -> None:
        nonlocal events
        events += 1

    done = 0
    async with Requester(url) as requester:
        stop = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await requester.call("tick", ms=job_ms, every_ms=every_ms,
                                     on_progress=seen if stream else None)
                done += 1

        await asyncio.gather(*(caller() for _ in range(inflight)))
    return done, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inflight", type=int, default=32, help="calls kept in flight")
    parser.add_argument("--job-ms", type=float, default=200, help="how long each job runs")
    parser.add_argument("--every-ms", type=float, default=10, help="progress interval")
    parser.add_argument("--seconds", type=float, default=8, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "streaming.md")
    args = parser.parse_args(argv)
    with TemporaryDirectory() as tmp:
        ports = [free_port() for _ in range(3)]
        env = {"DATABASE_URL": f"sqlite:///{tmp}/db.sqlite3", "BROKER_LOG_LEVEL": "WARNING"}
        broker = Proc("broker", [python(), "manage.py", "runbroker", "--worker-port",
                                 str(ports[0]), "--requester-port", str(ports[1]),
                                 "--http-port", str(ports[2])], env, Path(tmp), clean=True)
        worker = Proc("worker", [python(), "-m", "workers", "127.0.0.1", str(ports[0]),
                                 "--handlers", "bench.jobs", "--max-concurrency",
                                 str(args.inflight), "--log-level", "WARNING"], env, Path(tmp))
        try:
            url = f"ws://127.0.0.1:{ports[1]}"

            async def ready() -> None:
                async with Requester(url) as r:
                    await r.call("tick", ms=1, every_ms=1)

            wait_until(lambda: _try(lambda: asyncio.run(ready())), 60)
            rows = []
            for _ in range(args.rounds):
                for stream in (False, True):
                    cpu0 = tree_cpu_seconds([broker.pid]) or 0.0
                    done, events = asyncio.run(load(url, args.inflight, args.seconds,
                                                    args.job_ms, args.every_ms, stream))
                    cpu = (tree_cpu_seconds([broker.pid]) or 0.0) - cpu0
                    rows.append((stream, done, events, cpu))
        finally:
            worker.stop()
            broker.stop()
    report = render(rows, args)
    print(report)
    args.out.write_text(report, encoding="utf-8")
    return 0


def _try(func: object) -> bool:
    try:
        func()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True


def render(rows: list[tuple[bool, int, int, float]], args: argparse.Namespace) -> str:
    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    plain = [r for r in rows if not r[0]]
    streamed = [r for r in rows if r[0]]
    per_plain = median([cpu / done * 1e6 for _, done, _, cpu in plain])
    per_stream = median([cpu / done * 1e6 for _, done, _, cpu in streamed])
    events = median([ev / done for _, done, ev, _ in streamed])
    per_event = (per_stream - per_plain) / events if events else 0.0
    lines = [
        "# What a streamed request costs the broker",
        "",
        f"`python -m bench.streaming` ({args.inflight} in flight, jobs of {args.job_ms:g} ms "
        f"reporting progress every {args.every_ms:g} ms, {args.rounds} rounds of "
        f"{args.seconds:g} s; medians). Broker CPU per request:",
        "",
        "| run | requests | progress events per request | broker CPU per request |",
        "| --- | ---: | ---: | ---: |",
        f"| without progress | {median([d for _, d, _, _ in plain]):,.0f} | 0 | "
        f"{per_plain:,.0f} µs |",
        f"| streaming progress | {median([d for _, d, _, _ in streamed]):,.0f} | "
        f"{events:.1f} | {per_stream:,.0f} µs |",
        "",
        f"Each progress event passed on costs the broker about {per_event:,.1f} µs of CPU. "
        "A job's progress is sent by its worker either way (so that a requester that "
        "attaches later gets the rest of it); without watchers that asked, the broker "
        "drops it after noting the job's life.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
