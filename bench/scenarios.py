"""The scenario matrix and the runner of one scenario.

Not every cross product is run. The reference point is 64 requests in flight, 4
workers, 100 B payloads; every system runs there, at 1 in flight (latency) and
with 64 KiB payloads. The worker count (1, 16) is swept on the baseline and on
our broker under daphne and uvicorn. History on vs off runs once, at the
reference point.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (Proc, loads, machine_busy_seconds, python, tree_cpu_seconds,
                          tree_peak_rss_mb, tree_rss_mb)
from bench.systems import CELERY_POOL, System, Unavailable, make_system

REFERENCE = (64, 4, 100)  # in flight, workers, payload bytes
_subjects = itertools.count()


@dataclass(frozen=True)
class Scenario:
    system: str
    inflight: int
    workers: int
    payload: int

    @property
    def point(self) -> tuple[int, int, int]:
        return (self.inflight, self.workers, self.payload)

    @property
    def payload_label(self) -> str:
        return f"{self.payload // 1024} KiB" if self.payload >= 1024 else f"{self.payload} B"

    @property
    def label(self) -> str:
        return f"{self.system} f{self.inflight} w{self.workers} {self.payload_label}"

    @property
    def connections(self) -> int:
        """Requester connections: one per request up to 8 (64 in flight = 8 x 8)."""
        return max(1, min(8, self.inflight))


def parse_point(text: str) -> tuple[int, int, int]:
    """``"64:4:100"`` -> (in flight, workers, payload bytes); payload may end in k."""
    inflight, workers, payload = text.split(":")
    size = int(payload[:-1]) * 1024 if payload.lower().endswith("k") else int(payload)
    return int(inflight), int(workers), size


def matrix(mode: str, systems: list[str] | None = None,
           points: list[tuple[int, int, int]] | None = None) -> list[Scenario]:
    """The scenarios of a run. ``systems``/``points`` given: their cross product."""
    if points:
        names = systems or ["baseline", "daphne"]
        return [Scenario(s, *p) for p in points for s in names]
    every = ["baseline", "daphne", "uvicorn", "granian", "redis-2proc", "nats", "socketio",
             "celery"]
    if mode == "quick":
        plan = [Scenario(s, *REFERENCE) for s in every]
        plan += [Scenario(s, *REFERENCE) for s in ("daphne-nohist", "daphne-nostore")]
        plan += [Scenario(s, 1, 4, 100)
                 for s in ("baseline", "daphne", "daphne-nostore", "celery")]
    else:
        plan = []
        for point in [(1, 4, 100), REFERENCE, (64, 4, 65536)]:
            plan += [Scenario(s, *point) for s in every]
        plan += [Scenario(s, *REFERENCE) for s in (
            "daphne-nohist", "daphne-nostore", "daphne-nodb", "daphne-batch", "uvicorn-batch",
            "redis-2proc-spread", "uvicorn-sansio", "baseline-uvloop")]
        plan += [Scenario(s, 1, 4, 100) for s in ("daphne-nostore", "daphne-batch")]
        for workers in (1, 16):
            plan += [Scenario(s, 64, workers, 100) for s in ("baseline", "daphne", "uvicorn")]
        # The figures the targets hang on run three times (interleaved); the median counts.
        again = [Scenario(s, *REFERENCE) for s in ("baseline", "daphne", "daphne-nohist",
                                                    "daphne-nostore", "daphne-batch")]
        again += [Scenario(s, 1, 4, 100) for s in ("baseline", "daphne", "daphne-nostore")]
        plan += again * 2
    if systems:
        plan = [s for s in plan if s.system in systems]
    return plan


@dataclass
class Row:
    """One measured (or unavailable) scenario."""

    scenario: Scenario
    status: str = "ok"  # ok | n/a
    reason: str = ""
    description: str = ""
    rps: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    ok: int = 0
    errors: int = 0
    cpu: dict[str, float | None] = field(default_factory=dict)  # % of one core
    broker_rss_mb: float | None = None
    rss_kind: str = "peak"
    seconds: float = 0.0
    runs: int = 1
    rps_runs: list[float] = field(default_factory=list)
    loadgen: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scenario"] = {**asdict(self.scenario), "label": self.scenario.label}
        return d


class Runner:
    """Runs scenarios one at a time, each with fresh processes on fresh ports."""

    def __init__(self, workdir: Path, warmup: float, duration: float, redis_db: int = 15,
                 profile: Any = None, log: Any = print, celery_redis_db: int = 14,
                 celery_pool: str = CELERY_POOL) -> None:
        self.workdir = workdir
        self.warmup = warmup
        self.duration = duration
        self.redis_db = redis_db
        self.celery_redis_db = celery_redis_db
        self.celery_pool = celery_pool
        self.profile = profile  # callable(pid list, seconds) started at MEASURE, or None
        self.log = log

    def run(self, sc: Scenario) -> Row:
        system = make_system(sc.system, self.workdir, self.redis_db, self.celery_redis_db,
                             self.celery_pool)
        row = Row(sc, description=system.description)
        started = time.monotonic()
        workers = loadgen = None
        subject = f"bench.{os.getpid()}.{next(_subjects)}"  # NATS: one per scenario run
        try:
            system.start()
            workers = Proc(f"workers-{sc.system}", [
                python(), "-m", "bench.worker", "--proto", system.proto,
                "--url", system.worker_url, "--count", str(sc.workers),
                "--subject", subject, "--max-seconds", "600", *system.worker_args],
                log_dir=self.workdir)
            if workers.expect("READY", 30) is None:
                raise Unavailable(f"workers did not register in 30s: "
                                  f"{workers.log_tail(3) or system.log_tail() or 'no output'}")
            reason = system.check(sc.workers)
            if reason:
                raise Unavailable(reason)
            loadgen = Proc(f"loadgen-{sc.system}", [
                python(), "-m", "bench.loadgen", "--proto", system.proto,
                "--url", system.requester_url, "--inflight", str(sc.inflight),
                "--connections", str(sc.connections), "--payload", str(sc.payload),
                "--warmup", str(self.warmup), "--duration", str(self.duration),
                "--subject", subject, *system.loadgen_args], log_dir=self.workdir)
            groups = {"broker": system.broker_pids, "ext": system.ext_pids,
                      "workers": lambda: [workers.pid], "loadgen": lambda: [loadgen.pid]}
            if loadgen.expect("MEASURE", self.warmup + 40) is None:
                raise Unavailable(f"load generator did not start: {loadgen.log_tail(5)}")
            t0 = time.monotonic()
            cpu0 = {k: tree_cpu_seconds(f()) for k, f in groups.items()}
            busy0 = machine_busy_seconds()
            profiler = self.profile(system.broker_pids(), self.duration) \
                if self.profile else None
            if loadgen.expect("END", self.duration + 40) is None:
                raise Unavailable(f"load generator stalled: {loadgen.log_tail(5)}")
            t1 = time.monotonic()
            cpu1 = {k: tree_cpu_seconds(f()) for k, f in groups.items()}
            busy1 = machine_busy_seconds()
            pids = system.broker_pids()  # none for celery: Redis is its broker
            if pids and system.rss_mode == "peak":
                row.broker_rss_mb = tree_peak_rss_mb(pids)
            elif pids:
                row.broker_rss_mb = tree_rss_mb(pids)
                row.rss_kind = "current"
            line = loadgen.expect("RESULT", 40)
            if profiler is not None:
                profiler.finish()
            if line is None:
                raise Unavailable(f"no result from the load generator: {loadgen.log_tail(5)}")
            result = loads(line[len("RESULT "):])
            row.loadgen = result
            row.cpu = {k: (None if cpu0[k] is None or cpu1[k] is None or not groups[k]()
                           else round((cpu1[k] - cpu0[k]) / (t1 - t0) * 100, 1))
                       for k in groups}
            if busy0 is not None and busy1 is not None:
                # Everything else the machine did meanwhile (other users' jobs, the kernel's
                # softirq work on loopback): tells a disturbed row from a clean one.
                ours = sum(v for v in row.cpu.values() if v is not None)
                row.cpu["machine"] = round((busy1 - busy0) / (t1 - t0) * 100, 1)
                row.cpu["other"] = round(max(0.0, row.cpu["machine"] - ours), 1)
            row.ok, row.errors = result["ok"], result["errors"]
            if row.ok == 0 or row.errors > row.ok:
                raise Unavailable(f"{row.errors} of {row.ok + row.errors} requests failed: "
                                  f"{result.get('first_error') or 'no answers'}")
            row.rps = result["rps"]
            row.p50_ms = _num(result["p50_ms"])
            row.p99_ms = _num(result["p99_ms"])
            row.p999_ms = _num(result["p999_ms"])
        except Unavailable as exc:
            row.status, row.reason = "n/a", _short(str(exc))
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not end the run
            row.status, row.reason = "n/a", _short(f"harness error: {type(exc).__name__}: {exc}")
        finally:
            for proc in (loadgen, workers):
                if proc is not None:
                    proc.stop()
            system.stop()
            row.seconds = round(time.monotonic() - started, 1)
        return row


def rows_from_json(items: list[dict[str, Any]]) -> list[Row]:
    """Rows back from ``latest.json`` (for ``--render``)."""
    rows = []
    for d in items:
        sc = d["scenario"]
        row = Row(Scenario(sc["system"], sc["inflight"], sc["workers"], sc["payload"]))
        for name in ("status", "reason", "description", "rps", "ok", "errors", "cpu",
                     "broker_rss_mb", "rss_kind", "seconds", "runs", "rps_runs", "loadgen"):
            if name in d:
                setattr(row, name, d[name])
        for name in ("p50_ms", "p99_ms", "p999_ms"):
            setattr(row, name, _num(d.get(name)))
        rows.append(row)
    return rows


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per scenario (first-seen order): the run with the median throughput.

    With an even number of runs the lower middle one is taken. Runs that failed count
    only when every run failed.
    """
    groups: dict[Scenario, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.scenario, []).append(row)
    out = []
    for runs in groups.values():
        good = sorted((r for r in runs if r.status == "ok"), key=lambda r: r.rps)
        chosen = good[(len(good) - 1) // 2] if good else runs[-1]
        chosen.runs = len(runs)
        chosen.rps_runs = [round(r.rps, 1) for r in runs if r.status == "ok"]
        out.append(chosen)
    return out


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def make_runner(workdir: Path, warmup: float, duration: float, **kw: Any) -> Runner:
    return Runner(workdir, warmup, duration, **kw)


__all__ = ["Scenario", "Row", "Runner", "matrix", "parse_point", "REFERENCE", "System"]
