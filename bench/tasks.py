"""Django tasks through ``dispatch.tasks.FleetBackend``: ``python -m bench.tasks``.

For the embedded default (one broker, SQLite) and a cluster (two brokers over Redis
and PostgreSQL: the Django process enqueues through one, the fleetworker serves the
other, so every task crosses processes), a Django process that is neither (the
"web process") measures:

- at 1 in flight: how long ``enqueue()`` takes (it returns once the job is stored),
  and enqueue-to-start: from just before ``enqueue()`` to the task's first line on
  the fleetworker (same machine, same clock);
- at 64 in flight: tasks/s, each slot enqueuing a task and waiting for its result
  (``fleet.awatch``), and enqueue-to-start under that load.

Writes ``bench/results/tasks.md``. Needs Redis on 127.0.0.1:6379 and PostgreSQL on
127.0.0.1:5432 for the cluster (skipped, saying so, without them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import HOST, Proc, free_port, percentiles, port_open, python
from .systems import Ours, OursDaphne

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = f"postgres://postgres@{HOST}:5432/postgres"
PG_DB = "bench_tasks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200,
                        help="tasks at 1 in flight (default 200)")
    parser.add_argument("--tasks", type=int, default=2000,
                        help="tasks at 64 in flight (default 2000)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tasks.md"))
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        workdir = Path(tmp)
        error = Ours.migrate_template(workdir)
        if error:
            print(error, file=sys.stderr)
            return 1
        for name, run in (("embedded (SQLite, 1 process)", embedded),
                          ("cluster (Redis + PostgreSQL, 2 processes)", cluster)):
            print(f"== {name}", file=sys.stderr)
            result = run(workdir, args)
            rows.append((name, result))
            print(json.dumps(result), file=sys.stderr)
    Path(args.out).write_text(report(rows, args))
    print(Path(args.out).read_text())
    return 0


def embedded(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    broker = OursDaphne(workdir, name="tasks-embedded")
    broker.start()
    try:
        return measure(broker.worker_url, broker.requester_url, broker.db_env, workdir, args)
    finally:
        broker.stop()


def cluster(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not port_open(6379) or not port_open(5432):
        return {"skipped": "needs Redis on :6379 and PostgreSQL on :5432"}
    subprocess.run(["psql", PG_ADMIN, "-qc", f"DROP DATABASE IF EXISTS {PG_DB}"],
                   capture_output=True)
    subprocess.run(["psql", PG_ADMIN, "-qc", f"CREATE DATABASE {PG_DB}"], check=True,
                   capture_output=True)
    db_env = {"DATABASE_URL": f"postgres://postgres@{HOST}:5432/{PG_DB}"}
    migrate = Proc("migrate-pg", [python(), "manage.py", "migrate", "-v0"], db_env, workdir,
                   clean=True)
    if migrate.proc.wait(120) != 0:
        return {"skipped": f"migrate failed: {migrate.log_tail(5)}"}
    env = {"REDIS_URL": f"redis://{HOST}:6379/14", "BROKER_REDIS_PREFIX": f"bt{free_port()}"}
    a = OursDaphne(workdir, env, name="tasks-A")
    b = OursDaphne(workdir, env, name="tasks-B")
    try:
        a.start_on(free_port(), free_port(), free_port(), db_env)
        b.start_on(free_port(), free_port(), free_port(), db_env)
        return measure(b.worker_url, a.requester_url, db_env, workdir, args)
    finally:
        a.stop()
        b.stop()


def measure(worker_url: str, requester_url: str, db_env: dict[str, str], workdir: Path,
            args: argparse.Namespace) -> dict[str, Any]:
    fleetworker = Proc("fleetworker", [python(), "manage.py", "fleetworker", worker_url,
                                       "--tasks", "bench.django_tasks", "--max-concurrency",
                                       "64", "--log-level", "WARNING"], db_env, workdir)
    try:
        time.sleep(3)  # registered (a Django start)
        done = subprocess.run(
            [python(), "-m", "bench.tasks", "--client", "--sequential", str(args.sequential),
             "--tasks", str(args.tasks)], cwd=ROOT, capture_output=True, text=True,
            timeout=600, env={**os.environ, **db_env,
                              "BROKER_FLEET_URL": requester_url + "/"})
        if done.returncode != 0:
            return {"skipped": f"client failed: {done.stderr[-1500:]}"}
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        fleetworker.stop()


# --------------------------------------------------------------------------- the web process


def client(args: argparse.Namespace) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
    import django

    django.setup()
    from bench.django_tasks import stamp

    enqueue, to_start = [], []  # seconds
    for _ in range(args.sequential):
        before = time.time()
        result = stamp.enqueue()
        enqueue.append(time.time() - before)
        while not result.is_finished:
            time.sleep(0.001)
            result.refresh()
        to_start.append(result.return_value - before)
    out: dict[str, Any] = {"enqueue_ms": percentiles(enqueue, (50, 99)),
                           "to_start_ms": percentiles(to_start, (50, 99))}
    out.update(asyncio.run(loaded(stamp, args.tasks, 64)))
    print(json.dumps(out))
    return 0


async def loaded(stamp: Any, count: int, in_flight: int) -> dict[str, Any]:
    from dispatch import fleet

    to_start: list[float] = []  # seconds
    left = count

    async def slot() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            before = time.time()
            result = await stamp.aenqueue()
            async for event in fleet.awatch(result.id, timeout=60):
                if event["event"] == "result":
                    if not event["success"]:
                        raise RuntimeError(event["error"])
                    to_start.append(event["data"] - before)

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    return {"tasks_per_s": count / elapsed,
            "loaded_to_start_ms": percentiles(to_start, (50, 99))}


def report(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = ["# Django tasks through FleetBackend", "",
             f"`python -m bench.tasks` ({time.strftime('%Y-%m-%d')}): {args.sequential} tasks "
             f"at 1 in flight, {args.tasks} at 64 in flight; a trivial task (returns the "
             "time it started) on one `fleetworker --max-concurrency 64`.", "",
             "| system | enqueue p50 / p99 | enqueue-to-start p50 / p99 (1 in flight) | "
             "tasks/s (64 in flight) | enqueue-to-start p50 / p99 (64 in flight) |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        if "skipped" in r:
            why = " ".join(r["skipped"].split())[-200:].replace("|", "/")
            lines.append(f"| {name} | skipped: {why} | | | |")
            continue
        lines.append(
            f"| {name} | {r['enqueue_ms'][0]:.1f} / {r['enqueue_ms'][1]:.1f} ms | "
            f"{r['to_start_ms'][0]:.1f} / {r['to_start_ms'][1]:.1f} ms | "
            f"{r['tasks_per_s']:.0f} | {r['loaded_to_start_ms'][0]:.1f} / "
            f"{r['loaded_to_start_ms'][1]:.1f} ms |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
