"""Benchmark harness: our broker against a plain-websockets baseline, NATS, python-socketio
and Celery.

Runs a matrix of scenarios, each with fresh processes on fresh loopback ports:
the system under test, one bench-worker process (``bench/worker.py``) and one
load-generator process (``bench/loadgen.py``). The same worker and load generator
drive our broker and the baseline (same wire protocol). Prints a table and writes
``bench/results/latest.md``, ``latest.json`` and ``latest.png``.

Examples:
  python -m bench                 # full matrix, about 6-7 minutes
  python -m bench --quick         # smoke run, about 1-2 minutes
  python -m bench --scale         # add 50,000 idle workers and the reconnect test
  python -m bench --profile       # add a py-spy profile of the broker (daphne, 64 in flight)
  python -m bench --systems baseline,daphne --points 64:4:100,1:4:100
  python -m bench --systems baseline,daphne,celery --points 64:4:100,1:4:100
                                  # Celery 5 (apply_async + get) over the local Redis
  python -m bench --list          # show the scenarios without running them
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import report  # noqa: E402
from bench.common import BENCH, ROOT, psutil, raise_fd_limit  # noqa: E402
from bench.scenarios import (REFERENCE, Row, Runner, Scenario, matrix, median_rows,
                             parse_point)  # noqa: E402
from bench.systems import CELERY_POOL, SYSTEM_NAMES, Ours  # noqa: E402

MATRIX_NOTE = """\
Reference point: 64 requests in flight, 4 workers, 100 B payload each way. Full run: every
system (baseline, daphne, uvicorn, granian, redis-2proc, nats, socketio, celery) at 1 in
flight (4 workers, 100 B), at the reference point, and at 64 KiB payloads (64 in flight,
4 workers);
the worker count swept to 1 and 16 (64 in flight, 100 B) on baseline, daphne and uvicorn;
at the reference point only: daphne with BROKER_HISTORY=0, uvicorn with the websockets-sansio
protocol, and the baseline on uvloop. Quick run: every system at the reference point,
daphne with BROKER_HISTORY=0, and baseline, daphne and celery at 1 in flight. Celery's
"workers" is its one worker process and pool, whatever the point's worker count.
Each request carries a payload of random letters that the worker echoes back; the worker
does no other work, so the figures are the cost of the broker path. No connection
negotiates compression."""


def git_state() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout
        return sha + (" with uncommitted changes" if dirty.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in ("django", "channels", "daphne", "channels-redis", "websockets", "uvicorn",
                 "uvloop", "granian", "python-socketio", "nats-py", "orjson", "celery",
                 "kombu", "redis"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the reference point for every system, 1 s warm-up, "
                        "2.5 s measured (about 1-2 minutes)")
    p.add_argument("--systems", default="",
                   help=f"comma-separated systems to run (of: {', '.join(SYSTEM_NAMES)})")
    p.add_argument("--points", default="",
                   help="comma-separated INFLIGHT:WORKERS:PAYLOAD points (payload in bytes, or "
                        "with k for KiB), e.g. 64:4:100,1:4:100; with --systems runs their "
                        "cross product instead of the built-in matrix")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of warm-up per scenario (default 2, quick 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds measured per scenario (default 5, quick 2.5)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole plan this many times (interleaved) and report each "
                        "scenario's median-throughput run")
    p.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                   help="before each scenario wait up to this long for the machine to be "
                        "quiet (other work under 40%% of a core), for a shared machine")
    p.add_argument("--scale", action="store_true",
                   help="also run the scale scenarios (50,000 idle workers; 10,000 reconnecting)")
    p.add_argument("--scale-only", action="store_true", help="run only the scale scenarios")
    p.add_argument("--idle-workers", type=int, default=50_000, help="idle workers (scale)")
    p.add_argument("--reconnect-workers", type=int, default=10_000,
                   help="workers in the reconnect test (scale)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="short heartbeat interval of the extra idle run with 1,000 workers, "
                        "whose CPU is scaled to the 5 s default (the ladder itself runs at "
                        "5 s: the broker already saturates there)")
    p.add_argument("--idle-window", type=float, default=10.0,
                   help="seconds the idle broker's CPU is measured")
    p.add_argument("--profile", nargs="?", const="daphne", default="", metavar="SYSTEMS",
                   help="also profile the broker with py-spy during an extra run at the "
                        "reference point, not part of the table (default system: daphne; "
                        "e.g. --profile daphne,redis-2proc)")
    p.add_argument("--redis-db", type=int, default=15,
                   help="Redis database for redis-2proc (keys under a unique prefix, removed "
                        "afterwards)")
    p.add_argument("--celery-redis-db", type=int, default=14,
                   help="Redis database for celery, its broker and result backend (keys under "
                        "a unique prefix, removed afterwards; nothing is flushed)")
    p.add_argument("--celery-pool", default=CELERY_POOL, metavar="POOL:CONCURRENCY",
                   help=f"the celery worker's pool and size (default {CELERY_POOL}; e.g. "
                        "prefork:4)")
    p.add_argument("--out", default=str(BENCH / "results"),
                   help="directory for latest.md/.json/.png (default bench/results)")
    p.add_argument("--name", default="latest", help="base name of the output files")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the processes' logs (their folder is printed)")
    p.add_argument("--list", action="store_true", help="print the scenarios and exit")
    p.add_argument("--render", metavar="JSON", default="",
                   help="run nothing: rewrite the report (md/json/png under --out/--name) from "
                        "a saved JSON, e.g. after changing the report code")
    p.add_argument("--scale-from", metavar="JSON", default="",
                   help="with --render: take the scale results from this JSON instead")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.duration is None:
        args.duration = 2.5 if args.quick else 5.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(args)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEM_NAMES]
    if unknown:
        print(f"unknown system(s): {', '.join(unknown)}; choose from {', '.join(SYSTEM_NAMES)}",
              file=sys.stderr)
        return 2
    points = [parse_point(x) for x in args.points.split(",") if x.strip()]
    plan = [] if args.scale_only else matrix("quick" if args.quick else "full", systems, points)
    plan = plan * max(1, args.repeat)
    if args.list:
        for sc in plan:
            print(sc.label)
        print(f"{len(plan)} scenarios" + (" + scale" if args.scale or args.scale_only else ""))
        return 0
    if psutil is None:
        print("note: psutil is not installed: CPU and memory columns stay empty "
              "(pip install -r bench/requirements.txt)", file=sys.stderr)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    raise_fd_limit(4096)
    say = lambda text: print(text, flush=True)  # noqa: E731
    meta: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in
                                                 (argv if argv is not None else sys.argv[1:])),
        "cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "mem_gb": (psutil.virtual_memory().total / 2**30) if psutil else 0,
        "python": platform.python_version(), "kernel": platform.release(),
        "git": git_state(), "versions": versions(), "warmup": args.warmup,
        "duration": args.duration, "load_start": load_avg(), "matrix_note": MATRIX_NOTE,
        "client_loop": "uvloop" if _has("uvloop") else "asyncio",
    }
    rows: list[Row] = []
    runs: list[Row] = []
    scale = None
    profile_md = None
    started = time.monotonic()
    try:
        if any(sc.system not in ("baseline", "baseline-uvloop", "nats", "socketio", "celery")
               for sc in plan) or args.scale or args.scale_only or args.profile:
            error = Ours.migrate_template(workdir)
            if error:
                say(f"warning: {error}")
        runner = Runner(workdir, args.warmup, args.duration, redis_db=args.redis_db,
                        celery_redis_db=args.celery_redis_db, celery_pool=args.celery_pool)
        for i, sc in enumerate(plan, 1):
            if args.settle:
                wait_quiet(args.settle)
            row = runner.run(sc)
            runs.append(row)
            say(_progress(i, len(plan), row))
        rows = median_rows(runs)
        if args.profile:
            profile_md = "\n".join(run_profile(workdir, out_dir, args, name, say)
                                   for name in args.profile.split(","))
        if args.scale or args.scale_only:
            from bench.scale import run_scale

            scale = run_scale(workdir, args.idle_workers, args.reconnect_workers,
                              args.heartbeat, args.idle_window, say)
    finally:
        meta["load_end"] = load_avg()
        meta["elapsed_seconds"] = round(time.monotonic() - started, 1)
        if args.keep_logs:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta["profile_md"] = profile_md
    items = report.targets(rows, scale)
    md_path = out_dir / f"{args.name}.md"
    report.write_markdown(md_path, meta, rows, items, scale, profile_md)
    report.write_json(out_dir / f"{args.name}.json", meta, rows, items, scale)
    plot_note = None
    if not args.no_plot and rows:
        plot_note = report.write_plot(out_dir / f"{args.name}.png", rows,
                                      f"broker benchmark {meta['date']} – {meta['git']}")
    print()
    print(report.results_table(rows))
    print()
    print(report.targets_table(items))
    if scale:
        print()
        print(report.scale_section(scale))
    print(f"\nwrote {md_path} and {args.name}.json" + (
        "" if args.no_plot or not rows else
        f", {args.name}.png" if plot_note is None else f" ({plot_note})")
        + f" in {meta['elapsed_seconds']:.0f} s")
    return 0


def run_profile(workdir: Path, out_dir: Path, args: argparse.Namespace, system: str,
                say: Any) -> str:
    from bench.profiling import PySpy, py_spy_path, summarize

    title = f"### {system}, 64 in flight, 4 workers, 100 B\n\n"
    if py_spy_path() is None:
        return title + "_py-spy is not installed (pip install -r bench/requirements.txt)._\n"
    for old in out_dir.glob(f"{args.name}-profile-{system}-*.txt*"):
        old.unlink()
    spy = PySpy(out_dir / f"{args.name}-profile-{system}", rate=100)
    runner = Runner(workdir, args.warmup, max(args.duration, 8.0), redis_db=args.redis_db,
                    profile=spy, celery_redis_db=args.celery_redis_db,
                    celery_pool=args.celery_pool)
    say(f"profiling the broker ({system} at the reference point) with py-spy ...")
    row = runner.run(Scenario(system, *REFERENCE))
    if not spy.outputs:
        return title + f"_py-spy failed: {spy.error or row.reason}_\n"
    parts = [title + (
        f"py-spy record (100 Hz) of the broker process(es) over the measured "
        f"{runner.duration:.0f} s of an extra {system} run at the reference point, which "
        f"made {row.rps:,.0f} req/s under the profiler (broker CPU {row.cpu.get('broker')}% "
        f"of a core). Stacks: "
        + ", ".join(f"`{p.name}`" for p in spy.outputs)
        + " (collapsed format, gzipped: open in speedscope.app, or gunzip for "
          "flamegraph.pl).\n")]
    for i, raw in enumerate(spy.outputs):
        if len(spy.outputs) > 1:
            parts.append(f"#### process {i + 1} of {len(spy.outputs)} "
                         f"({'requester side' if i == 0 else 'worker side'})\n")
        parts.append(summarize(raw, top=15))
    return "\n".join(parts)


def render(args: argparse.Namespace) -> int:
    """Rewrite md/json/png from a saved run (rows, meta, targets recomputed)."""
    import json

    from bench.scenarios import rows_from_json

    data = json.loads(Path(args.render).read_text())
    meta, rows = data["meta"], rows_from_json(data["rows"])
    scale = json.loads(Path(args.scale_from).read_text())["scale"] if args.scale_from \
        else data.get("scale")
    if args.scale_from:
        meta["command"] += " ; scale: " + json.loads(Path(args.scale_from).read_text())[
            "meta"]["command"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = report.targets(rows, scale)
    report.write_markdown(out_dir / f"{args.name}.md", meta, rows, items, scale,
                          meta.get("profile_md"))
    report.write_json(out_dir / f"{args.name}.json", meta, rows, items, scale)
    if not args.no_plot:
        report.write_plot(out_dir / f"{args.name}.png", rows,
                          f"broker benchmark {meta['date']} – {meta['git']}")
    print(f"rewrote {out_dir / args.name}.md/.json/.png from {args.render}")
    return 0


def wait_quiet(limit: float, threshold: float = 40.0) -> float:
    """Wait (at most ``limit`` s) until the machine's busy CPU over 1 s is under ``threshold``%."""
    from bench.common import machine_busy_seconds

    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        b0 = machine_busy_seconds()
        if b0 is None:
            break
        time.sleep(1.0)
        b1 = machine_busy_seconds()
        if b1 is not None and (b1 - b0) * 100 < threshold:
            break
    return time.monotonic() - t0


def _progress(i: int, n: int, row: Row) -> str:
    head = f"[{i:2d}/{n}] {row.scenario.label:<34}"
    if row.status != "ok":
        return f"{head} n/a ({row.reason})  [{row.seconds:.0f}s]"
    cpu, other = row.cpu.get("broker"), row.cpu.get("other")
    redis = row.cpu.get("ext")
    return (f"{head} {row.rps:9,.0f} req/s  p50 {row.p50_ms:7.2f}  p99 {row.p99_ms:7.2f} ms  "
            f"broker CPU {cpu if cpu is not None else '–'}%"
            + (f"  redis {redis}%" if redis is not None else "")
            + f"  workers {row.cpu.get('workers', '–')}%"
            f"  other {other if other is not None else '–'}%  [{row.seconds:.0f}s]")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
