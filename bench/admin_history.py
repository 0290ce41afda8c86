"""How fast the admin's request history is on a big table: ``python -m bench.admin_history``.

Fills a throwaway database with ``--rows`` history rows, written the way the history
writer writes them (its multi-row INSERTs, 10,000 rows a transaction), then times GETs
of the request changelist as a logged-in superuser with ``django.test.Client``:
unfiltered, filtered, searched, a deep page, one request's page and the worker list.
SQLite lives in a temporary directory; with ``--database-url postgres://...`` a fresh
database is created on that server and dropped afterwards. PostgreSQL is vacuumed
and analysed after the insert, as autovacuum would; SQLite is not (nothing analyses it
in production either).

Prints a table and writes it into ``bench/results/admin_history.md``, one section per
``--label`` (default: the database kind), so SQLite and PostgreSQL runs sit side by side.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import django
from django.utils import timezone

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("echo", "resize", "train", "get_time", "calculate", "scrape", "render",
            "transcode", "embed", "classify", "ocr", "summarise")
WORKERS = tuple(f"{i:02d}{random.Random(i).getrandbits(40):010x}" for i in range(40))
FAILURES = (("handler_failed", "ZeroDivisionError: division by zero"),
            ("timeout", "Worker response timeout"),
            ("worker_lost", "Worker lost (w went away) after 3 attempts"),
            ("command_error", "numbers must not be empty"),
            ("no_workers", "No available workers"))
PROCESSES = ("broker-1:4242:ab12", "broker-2:4343:cd34", "broker-3:4444:ef56")
CHUNK = 10_000
DAYS = 30


def records(start: int, count: int, now: float, span: float, rnd: random.Random
            ) -> list[dict[str, Any]]:
    """Rows ``start`` to ``start + count`` of the history, row i finished ``i * span``
    seconds before ``now``; commands and workers skewed (a few are busy), 5% failures."""
    out = []
    for i in range(start, start + count):
        finished = now - i * span
        latency = rnd.lognormvariate(1.5, 1.2)
        failed = rnd.random() < 0.05
        code, error = rnd.choice(FAILURES) if failed else ("", "")
        worker = WORKERS[min(int(rnd.expovariate(0.1)), len(WORKERS) - 1)]
        out.append({
            "request_id": f"req-{i:09d}-{rnd.getrandbits(32):08x}",
            "command": COMMANDS[min(int(rnd.expovariate(0.4)), len(COMMANDS) - 1)],
            "worker_id": "" if code == "no_workers" else worker, "success": not failed,
            "error": error, "latency_ms": latency, "attempts": 1 + (rnd.random() < 0.02),
            "requester": (f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}:"
                          f"{rnd.randrange(1024, 65535)}"),
            "started_at": finished - latency / 1000, "finished_at": finished,
            "workers_lost": int(code == "worker_lost") * 3, "code": code,
            "routing": f"least_loaded: 2 of 3; {worker} 1.05 vs 4.2",
            "placed_at": None if code == "no_workers" else finished - latency / 1000 + 0.0002,
            "traceparent": f"00-{rnd.getrandbits(128):032x}-{rnd.getrandbits(64):016x}-01"
            if rnd.random() < 0.3 else "",
        })
    return out


def fill(rows: int, seed: int) -> None:
    """Insert ``rows`` history rows and a few worker registrations, with progress."""
    from django.db import transaction

    from dispatch.history import _insert_requests
    from dispatch.models import WorkerSession

    rnd = random.Random(seed)
    now, span = time.time(), DAYS * 86400 / max(rows, 1)
    started = time.perf_counter()
    for start in range(0, rows, CHUNK):
        batch = records(start, min(CHUNK, rows - start), now, span, rnd)
        with transaction.atomic():
            _insert_requests(batch, PROCESSES[(start // CHUNK) % len(PROCESSES)])
        done = start + len(batch)
        if done % (CHUNK * 10) == 0 or done == rows:
            elapsed = time.perf_counter() - started
            print(f"  inserted {done:,} / {rows:,} rows ({elapsed:.0f} s, "
                  f"{done / elapsed:,.0f} rows/s)", file=sys.stderr, flush=True)
    moment = timezone.now()
    WorkerSession.objects.bulk_create(
        WorkerSession(session_id=f"s{i}", worker_id=w, name=f"gpu-{i}", connected_at=moment,
                      last_seen=moment, status="offline", disconnected_at=moment,
                      requests_served=rnd.randrange(100_000), commands=list(COMMANDS))
        for i, w in enumerate(WORKERS))


def analyse() -> None:
    """What autovacuum does on PostgreSQL after a big insert (visibility map, statistics)."""
    from django.db import connection

    if connection.vendor == "postgresql":
        print("  VACUUM ANALYZE ...", file=sys.stderr, flush=True)
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")


def pages() -> list[tuple[str, str]]:
    """(what, URL) of each page timed; ids taken from the table as filled."""
    from dispatch.models import RequestRecord

    base = "/admin/dispatch/requestrecord/"
    some = RequestRecord.objects.order_by("-finished_at").values("pk", "request_id")[500]
    return [
        ("request list", base),
        ("failures only", f"{base}?success__exact=0"),
        ("one error code", f"{base}?code=timeout"),
        ("one command (rare)", f"{base}?command={COMMANDS[-1]}"),
        ("one command (busy)", f"{base}?command={COMMANDS[0]}"),
        ("one worker (from its registration)", f"{base}?worker_id={WORKERS[5]}"),
        ("search: a request id", f"{base}?q={some['request_id']}"),
        ("search: a worker id", f"{base}?q={WORKERS[5]}"),
        ("past 7 days", f"{base}?{_days_ago(7)}"),
        ("page 50", f"{base}?p=50"),
        ("one request's page", f"{base}{some['pk']}/change/"),
        ("worker registrations", "/admin/dispatch/workersession/"),
    ]


def _days_ago(days: int) -> str:
    """The query string of the date filter's "Past 7 days" (and the like)."""
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    return urlencode({"finished_at__gte": str(today - timedelta(days=days)),
                      "finished_at__lt": str(today + timedelta(days=1))})


def measure(repeat: int) -> list[dict[str, Any]]:
    """Median and best of ``repeat`` GETs of each page (after one untimed), with the
    queries of one more GET: how many, and the slowest."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    user = get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)
    results = []
    for what, url in pages():
        response = client.get(url)
        if response.status_code != 200:
            raise SystemExit(f"GET {url}: {response.status_code}")
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            client.get(url)
            times.append((time.perf_counter() - started) * 1000)
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        slowest = max(queries.captured_queries, key=lambda q: float(q["time"]))
        results.append({"what": what, "url": url, "median": statistics.median(times),
                        "best": min(times), "queries": len(queries),
                        "slowest": float(slowest["time"]) * 1000, "sql": slowest["sql"]})
        print(f"  {what}: {statistics.median(times):,.0f} ms", file=sys.stderr, flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| page | URL | median | best | queries | slowest query |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['what']} | `{r['url']}` | {r['median']:,.0f} ms | "
                     f"{r['best']:,.0f} ms | {r['queries']} | {r['slowest']:,.1f} ms |")
    return "\n".join(lines)


def write_section(path: Path, label: str, body: str) -> None:
    """Replace (or add) the ``## label`` section of ``path``, keeping the others."""
    head = "# Admin request history on a big table (`python -m bench.admin_history`)\n"
    text = path.read_text(encoding="utf-8") if path.exists() else head
    sections = text.split("\n## ")
    kept = [s for s in sections[1:] if s.split("\n", 1)[0].split(" (")[0] != label]
    path.write_text("\n## ".join([sections[0].rstrip("\n") + "\n", *kept,
                                  f"{label} {body.rstrip()}\n"]), encoding="utf-8")


def git_head() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin_history", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="history rows to insert (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed GETs per page, after one untimed (default 5)")
    parser.add_argument("--database-url", metavar="URL",
                        help="a PostgreSQL server to use instead of SQLite, e.g. "
                             "postgres://postgres@127.0.0.1:5432/test (a fresh database is "
                             "created there and dropped afterwards)")
    parser.add_argument("--label", help="the results section's name (default: the database "
                                        "kind, sqlite or postgresql)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "admin_history.md",
                        help="where to write the table (default bench/results/admin_history.md)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="admin-history-") as tmp:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
        from django.conf import settings

        from brokersite.settings import database_from_url

        database = database_from_url(args.database_url or f"sqlite:///{tmp}/history.sqlite3")
        database["TEST"] = {"NAME": database["NAME"] if not args.database_url
                            else f"bench_admin_history_{os.getpid()}"}
        settings.DATABASES = {"default": database}  # before setup: no connection exists yet
        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
        django.setup()
        from django.db import connection

        print(f"{connection.vendor}: creating a throwaway database, migrating ...",
              file=sys.stderr, flush=True)
        original = connection.settings_dict["NAME"]
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        try:
            print(f"inserting {args.rows:,} history rows ...", file=sys.stderr, flush=True)
            fill(args.rows, args.seed)
            analyse()
            print(f"timing {args.repeat} GETs per page ...", file=sys.stderr, flush=True)
            results = measure(args.repeat)
            server = connection.get_database_version()
        finally:
            connection.creation.destroy_test_db(original, verbosity=0)
    text = table(results)
    print(text)
    slowest = max(results, key=lambda r: r["slowest"])
    label = args.label or connection.vendor
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, label, (
        f"({args.rows:,} rows; {connection.vendor} {'.'.join(map(str, server))}; "
        f"git {git_head()}, {time.strftime('%Y-%m-%d')})\n\n{text}\n\n"
        f"Slowest query ({slowest['what']}, {slowest['slowest']:,.1f} ms):\n\n"
        f"```sql\n{slowest['sql'][:1500]}\n```\n"))
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
