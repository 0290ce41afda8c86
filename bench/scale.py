"""Scale scenarios: many idle workers on one broker process; reconnect after a restart."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import (Proc, http_json, python, raise_fd_limit, tree_cpu_seconds,
                          tree_rss_mb)
from bench.systems import Ours, OursAsgi, OursDaphne, Unavailable

PER_PROCESS = 2500  # worker connections per bench-worker process
DEFAULT_INTERVAL = 5.0
#: Heartbeat interval of the extra run that shows what rarer heartbeats save.
SLOW_INTERVAL = 30.0
#: Most workers that start dialling at once.
WAVE = 5000
#: A step whose registered count has not grown for this long has saturated the broker.
STALLED_SECONDS = 30.0


#: A fleet dials from a few source addresses (as from behind one NAT): no cap per address.
FLEET_ENV = {"BROKER_MAX_CONNECTIONS_PER_ADDRESS": "0"}
#: Loopback source addresses (all of 127.0.0.0/8 is loopback), one fleet after another.
_ADDRESSES = (f"127.0.{b}.{c}" for b in range(1, 255) for c in range(1, 255))


def _spawn_workers(url: str, total: int, workdir: Path, tag: str, dial: int = 100
                   ) -> list[Proc]:
    procs = []
    # Fresh source addresses for every fleet, 10,000 connections each: a connection
    # bound to an address holds its port while in TIME_WAIT (60 s after the fleet
    # before it closed), and one address has only ~28,000 ports.
    sources = [next(_ADDRESSES) for _ in range(1 + total // 10_000)]
    nproc = max(1, math.ceil(total / PER_PROCESS))
    for k in range(nproc):
        count = total // nproc + (1 if k < total % nproc else 0)
        procs.append(Proc(f"{tag}-workers-{k}", [
            python(), "-m", "bench.worker", "--url", url, "--count", str(count),
            "--prefix", f"{tag}{k}", "--dial-concurrency", str(dial), "--max-seconds", "900",
            "--source", ",".join(sources)],
            log_dir=workdir))
    return procs


def _count(system: Ours) -> int:
    try:
        return int(http_json(system.health_url, 3.0).get("workers", 0))
    except Exception:  # noqa: BLE001 - busy or restarting
        return -1


def _connect_all(system: Ours, n: int, timeout: float, log: Callable[[str], None]
                 ) -> float:
    t0 = time.monotonic()
    best, grew = -1, t0
    while time.monotonic() - t0 < timeout:
        seen = _count(system)
        if seen > best or seen < 0:  # more, or too busy to say: not stalled
            best, grew = max(best, seen), time.monotonic()
        if seen >= n:
            return time.monotonic() - t0
        if time.monotonic() - grew > STALLED_SECONDS:
            timeout = time.monotonic() - t0  # no progress: the broker cannot keep up
            break
        time.sleep(1.0)
    if best < 0:
        raise Saturated(f"not all {n} registered within {timeout:.0f}s: /healthz never answered "
                        f"within 3 s while they dialled (broker busy)", best)
    raise Saturated(f"only {best} of {n} workers registered within {timeout:.0f}s", best)


class Saturated(Unavailable):
    """Not every worker registered in time; ``best`` is the most the broker listed."""

    def __init__(self, message: str, best: int) -> None:
        super().__init__(message)
        self.best = best


def _established(pids: list[int]) -> int | None:
    """TCP connections the broker holds open (registered or not)."""
    from bench.common import psutil

    if psutil is None:
        return None
    total = 0
    for pid in pids:
        try:
            total += sum(1 for c in psutil.Process(pid).net_connections(kind="tcp")
                         if c.status == "ESTABLISHED")
        except psutil.Error:
            pass
    return total


def _measure(system: Ours, procs: list[Proc], window: float) -> dict[str, float]:
    pids, wpids = system.broker_pids(), [p.pid for p in procs]
    c0, w0, t0 = tree_cpu_seconds(pids), tree_cpu_seconds(wpids), time.monotonic()
    time.sleep(window)
    c1, w1, t1 = tree_cpu_seconds(pids), tree_cpu_seconds(wpids), time.monotonic()
    if c0 is None or c1 is None:
        raise Unavailable("psutil is not installed: no CPU figures")
    return {"cpu_pct": (c1 - c0) / (t1 - t0) * 100,
            "workers_cpu_pct": ((w1 or 0) - (w0 or 0)) / (t1 - t0) * 100,
            "rss_mb": tree_rss_mb(pids) or 0.0, "registered": _count(system),
            "connections": _established(pids)}


def idle_ladder(workdir: Path, steps: list[int], interval: float, window: float,
                log: Callable[[str], None], env: dict[str, str] | None = None,
                tag: str = "idle", server: str = "daphne") -> dict[str, Any]:
    """One broker; idle workers added step by step; RSS and CPU measured at each step.

    Stops at the first step whose workers do not all register in time (the broker
    cannot keep up), recording how far it got. ``server``: daphne (runbroker, the
    embedded default) or uvicorn-sansio (the same application on uvicorn).
    """
    broker_env = {"BROKER_HEARTBEAT_INTERVAL": str(interval), **FLEET_ENV, **(env or {})}
    system: Ours = (OursDaphne(workdir, broker_env, name=f"{tag}-{interval:g}s")
                    if server == "daphne" else
                    OursAsgi(workdir, "uvicorn", ws="websockets-sansio", env=broker_env))
    procs: list[Proc] = []
    out: dict[str, Any] = {"interval": interval, "steps": [], "env": env or {}}
    try:
        system.start()
        time.sleep(1.0)
        out["rss0_mb"] = rss0 = tree_rss_mb(system.broker_pids()) or 0.0
        have = 0
        for n in steps:
            log(f"  {tag}: {n} idle workers, heartbeat {interval} s ...")
            step: dict[str, Any] = {"workers": n}
            try:
                step["connect_seconds"] = 0.0
                # In waves: the bench clients dialling 20,000 at once take both cores.
                while have < n:
                    wave = min(n, have + WAVE)
                    procs += _spawn_workers(system.worker_url, wave - have, workdir,
                                            f"{tag}{wave}x")
                    have = wave
                    step["connect_seconds"] += _connect_all(system, have, 30 + WAVE / 200, log)
            except Saturated as exc:
                step["status"] = "saturated"
                step["reason"] = str(exc)
                step.update(_measure(system, procs, window))  # what it costs while trying
                step["registered"] = max(exc.best, step["registered"])  # -1: unknown
                held = step.get("connections") or n
                step["kb_per_conn"] = (step["rss_mb"] - rss0) * 1024 / max(1, held)
                out["steps"].append(step)
                log(f"    {exc}; broker CPU {step['cpu_pct']:.0f}%")
                break
            time.sleep(max(3.0, interval))
            step.update(_measure(system, procs, window))
            step["status"] = "ok"
            step["kb_per_conn"] = (step["rss_mb"] - rss0) * 1024 / n
            out["steps"].append(step)
            log(f"    registered in {step['connect_seconds']:.1f} s; broker CPU "
                f"{step['cpu_pct']:.1f}%, RSS {step['rss_mb']:.0f} MB")
        return out
    finally:
        for proc in procs:
            proc.stop()
        system.stop()


def run_idle(workdir: Path, n: int, short_interval: float, window: float,
             log: Callable[[str], None]) -> dict[str, Any]:
    """The idle-fleet figures: a ladder up to ``n`` at the 5 s default, one short-interval
    run scaled to 5 s (to check the scaling), and history off at a middle step."""
    steps = [s for s in (1000, 2500, 10_000, 20_000, 30_000) if s < n] + [n]
    base = steps[0]
    try:
        ladder = idle_ladder(workdir, steps, DEFAULT_INTERVAL, window, log)
        short = idle_ladder(workdir, [base], short_interval, window, log, tag="short")
        mid = steps[-2] if len(steps) > 1 else base
        nohist = idle_ladder(workdir, [mid], DEFAULT_INTERVAL, window, log,
                             env={"BROKER_HISTORY": "0"}, tag="nohist")
        # The two ways to a cheaper idle fleet: a leaner server, or rarer heartbeats.
        uvicorn = idle_ladder(workdir, [n], DEFAULT_INTERVAL, window, log, tag="uvicorn",
                              server="uvicorn-sansio")
        slow = idle_ladder(workdir, [n], SLOW_INTERVAL, window, log, tag="slow")
    except Unavailable as exc:
        return {"status": "n/a", "reason": str(exc), "workers": n}
    result: dict[str, Any] = {"status": "ok", "workers": n, "interval": DEFAULT_INTERVAL,
                              "short_interval": short_interval, "ladder": ladder,
                              "short": short, "nohist": nohist, "uvicorn": uvicorn,
                              "slow": slow, "slow_interval": SLOW_INTERVAL,
                              "rss0_mb": ladder["rss0_mb"]}
    last = ladder["steps"][-1]
    result["reached"] = last["workers"] if last["status"] == "ok" else last.get("registered")
    result["final"] = last
    # The whole fleet's registration: the steps' waves, without the measuring between.
    result["register_seconds"] = (sum(s["connect_seconds"] for s in ladder["steps"])
                                  if last["status"] == "ok" else None)
    result["rss_mb"] = last["rss_mb"]
    result["cpu_pct_default"] = last["cpu_pct"]
    ok_steps = [s for s in ladder["steps"] if s["status"] == "ok"]
    result["kb_per_conn"] = (ok_steps[-1] if ok_steps else last)["kb_per_conn"]
    sstep = short["steps"][0] if short["steps"] else None
    if sstep and sstep["status"] == "ok":
        result["short_cpu_pct"] = sstep["cpu_pct"]
        result["short_scaled_pct"] = sstep["cpu_pct"] * short_interval / DEFAULT_INTERVAL
        result["short_workers"] = sstep["workers"]
    # Per-worker idle cost from the largest fully registered step, extrapolated to n.
    good = [s for s in ladder["steps"] if s["status"] == "ok"]
    if good:
        g = good[-1]
        result["cpu_per_1000"] = g["cpu_pct"] / g["workers"] * 1000
        result["cpu_pct_at_5s"] = g["cpu_pct"] / g["workers"] * n
        result["cpu_note"] = (
            f"{g['cpu_pct']:.1f}% measured with {g['workers']:,} workers at the 5 s default"
            + ("" if g["workers"] == n else
               f", i.e. {result['cpu_per_1000']:.1f}% per 1,000 workers, extrapolated to "
               f"{n:,}; the broker could not hold {n:,} (see the ladder)"))
    else:
        result["cpu_pct_at_5s"] = last["cpu_pct"]
        result["cpu_note"] = "no step registered fully; CPU while trying"
    if last["status"] != "ok":
        result["saturated"] = last.get("reason")
    return result


def run_reconnect(workdir: Path, n: int, log: Callable[[str], None],
                  backoff_initial: float = 1.0) -> dict[str, Any]:
    """``n`` workers connected; restart the broker on the same ports; time the comeback."""
    from bench.common import free_port

    first = OursDaphne(workdir, FLEET_ENV, name="restart-1")
    second = OursDaphne(workdir, FLEET_ENV, name="restart-2")
    procs: list[Proc] = []
    try:
        ports = (free_port(), free_port(), free_port())
        first.start_on(*ports)
        procs = _spawn_workers(first.worker_url, n, workdir, "rc")
        _connect_all(first, n, 120, log)
        log(f"  {n} workers registered; restarting the broker ...")
        t_stop = time.monotonic()
        first.stop()
        t_stopped = time.monotonic()
        second.start_on(*ports, db_env=first.db_env)
        t_ready = time.monotonic()
        marks: dict[float, int] = {}
        deadline = t_ready + 120
        done_at = None
        while time.monotonic() < deadline:
            seen = _count(second)
            elapsed = time.monotonic() - t_ready
            for mark in (1.0, 2.0, 5.0):
                if elapsed >= mark and mark not in marks:
                    marks[mark] = max(seen, 0)
            if seen >= n:
                done_at = time.monotonic()
                break
            time.sleep(0.1)
        if done_at is None:
            raise Unavailable(f"only {_count(second)} of {n} workers came back within 120 s")
        for mark in (1.0, 2.0, 5.0):
            marks.setdefault(mark, n)
        return {"status": "ok", "workers": n, "backoff_initial": backoff_initial,
                "stop_seconds": t_stopped - t_stop, "start_seconds": t_ready - t_stopped,
                "reconnect_seconds": done_at - t_ready, "total_seconds": done_at - t_stop,
                "after_1s": marks[1.0], "after_2s": marks[2.0], "after_5s": marks[5.0]}
    except Unavailable as exc:
        return {"status": "n/a", "reason": str(exc), "workers": n}
    finally:
        for proc in procs:
            proc.stop()
        second.stop()
        first.stop()


def run_scale(workdir: Path, idle_workers: int, reconnect_workers: int, interval: float,
              window: float, log: Callable[[str], None]) -> dict[str, Any]:
    soft, hard = raise_fd_limit(idle_workers + 2048)
    out: dict[str, Any] = {"fd_limit": [soft, hard]}
    need = idle_workers + 512
    if soft < need:
        usable = max(100, soft - 512)
        out["fd_note"] = (f"too low for {idle_workers} connections (need about {need}); "
                          f"running {usable} instead")
        idle_workers = usable
    log(f"scale: up to {idle_workers} idle workers ...")
    out["idle"] = run_idle(workdir, idle_workers, interval, window, log)
    log(f"scale: {reconnect_workers} workers reconnecting after a restart ...")
    out["reconnect"] = run_reconnect(workdir, reconnect_workers, log)
    return out
