"""Helpers shared by the harness, the load generator and the bench worker.

Kept free of Django and of the broker's own modules: the bench drives the broker
from the outside, over its sockets, exactly as the baselines are driven.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HOST = "127.0.0.1"  # the only address the bench ever targets

try:
    import orjson

    def dumps(obj: Any) -> str:
        return orjson.dumps(obj).decode()

    loads = orjson.loads
except ImportError:  # pragma: no cover - the broker's requirements include orjson
    def dumps(obj: Any) -> str:
        return json.dumps(obj, separators=(",", ":"))

    loads = json.loads

try:
    import psutil
except ImportError:  # pragma: no cover - CI has only the broker's requirements
    psutil = None


def install_fast_loop() -> str:
    """Use uvloop for the bench's own clients when it is installed (leaner clients)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def payload_text(size: int, seed: int = 1) -> str:
    """``size`` ASCII letters that JSON needs no escapes for, and that do not compress
    to nothing (no connection negotiates compression anyway)."""
    rnd = random.Random(seed)
    return "".join(rnd.choices(string.ascii_letters + string.digits, k=size))


def raise_fd_limit(want: int) -> tuple[int, int]:
    """Raise this process's soft file-descriptor limit toward ``want`` (children inherit it).

    Returns ``(soft, hard)`` after the change; the soft limit never exceeds the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root may raise the hard limit too (up to fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
            hard = want
        except (ValueError, OSError):
            pass
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_json(url: str, timeout: float = 2.0) -> Any:
    assert url.startswith(f"http://{HOST}:"), url  # loopback only
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy; returns its value, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - a service that is still coming up
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


# ------------------------------------------------------------------------ processes


class Proc:
    """A child process whose stdout lines are read by a thread (``expect`` waits for one)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None,
                 log_dir: Path | None = None, clean: bool = False) -> None:
        self.name = name
        self.args = args
        inherited = dict(os.environ)
        if clean:  # a broker gets exactly the settings its system gives it
            for key in list(inherited):
                if key in ("REDIS_URL", "DATABASE_URL") or key.startswith("BROKER_"):
                    del inherited[key]
        full_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.stderr_path = (log_dir / f"{name}.log") if log_dir else None
        self._stderr = open(self.stderr_path, "wb") if self.stderr_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.lines: deque[str] = deque(maxlen=2000)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(self, prefix: str, timeout: float) -> str | None:
        """Wait for (and consume) the first stdout line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in list(self.lines):
                    if line.startswith(prefix):
                        self.lines.remove(line)
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(remaining, 0.2))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        if not self.stderr_path or not self.stderr_path.exists():
            return ""
        lines = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # its own session: the server and its children
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if self._stderr not in (subprocess.DEVNULL, None):
            self._stderr.close()


# ------------------------------------------------------------------------ measurements


def _tree(pid: int) -> list[Any]:
    if psutil is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU seconds of the processes ``pids`` and all their descendants."""
    if psutil is None:
        return None
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        for p in _tree(pid):
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores; not idle, not iowait)."""
    if psutil is None:
        return None
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) \
        - getattr(t, "guest_nice", 0.0)


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_peak_rss_mb(pids: list[int]) -> float | None:
    """Peak resident set (VmHWM) summed over the process trees, in MiB."""
    if psutil is None:
        return None
    seen = {p.pid for pid in pids for p in _tree(pid)}
    return sum(_status_kb(pid, "VmHWM") for pid in seen) / 1024


def tree_rss_mb(pids: list[int]) -> float | None:
    """Current resident set summed over the process trees, in MiB."""
    if psutil is None:
        return None
    seen = {p.pid for pid in pids for p in _tree(pid)}
    return sum(_status_kb(pid, "VmRSS") for pid in seen) / 1024


def find_pids(name: str, listen: str = "") -> list[int]:
    """Pids of running processes called ``name`` (redis-server, nats-server).

    With ``listen`` (e.g. ``":6379"``), only those whose command line (redis-server's
    title is ``redis-server 127.0.0.1:6379``) contains it, when any does: a test suite's
    own redis-server on another port is not the one the bench uses.
    """
    if psutil is None:
        return []
    found: list[tuple[int, str]] = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == name:
            found.append((p.pid, " ".join(p.info["cmdline"] or ())))
    if listen and any(listen in cmd for _, cmd in found):
        return [pid for pid, cmd in found if listen in cmd]
    return [pid for pid, _ in found]


class RssSampler:
    """Samples the current RSS of some processes in a thread; keeps the maximum."""

    def __init__(self, pids: list[int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss_mb(self.pids) or 0.0)

    def __enter__(self) -> RssSampler:
        self.peak = tree_rss_mb(self.pids) or 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def percentiles(samples: list[float], qs: Iterator[float] | tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles of ``samples`` (seconds in, milliseconds out)."""
    if not samples:
        return [float("nan") for _ in qs]
    ordered = sorted(samples)
    n = len(ordered)
    out = []
    for q in qs:
        rank = min(n - 1, max(0, int(round(q / 100 * n + 0.5)) - 1))
        out.append(ordered[rank] * 1000)
    return out


def fd_limit() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def python() -> str:
    return sys.executable
