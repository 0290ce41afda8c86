"""Real processes for integration tests: a daphne broker and `python -m workers`.

Everything listens on 127.0.0.1, on ports the OS says are free, and every wait
is bounded so a broken build fails fast instead of hanging CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

#: Fast heartbeats so that failure detection takes a second, not fifteen.
FAST_ENV = {"BROKER_HEARTBEAT_INTERVAL": "0.5", "BROKER_HEARTBEAT_MISSES": "3",
            "BROKER_HISTORY_FLUSH_SECONDS": "0.2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_rows(count: int, step: int, rows: int) -> list[int]:
    """``count`` ports p such that p, p + step, ... (``rows`` of them) are all free now.

    For ``runbroker --processes``, whose process i listens on each port + i x step: a
    port the OS said was free says nothing about the one ``step`` above it.
    """
    for _ in range(200):
        bases = [free_port() for _ in range(count)]
        wanted = [b + i * step for b in bases for i in range(rows)]
        if len(set(wanted)) < len(wanted) or max(wanted) > 65535:
            continue
        held = []
        try:
            for port in wanted:
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return bases
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} free rows of {rows} ports {step} apart")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling a service that is coming up
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
                ) -> Any:
    """:func:`wait_for` for async tests: polls in a thread so the event loop keeps running."""
    return await asyncio.to_thread(wait_for, predicate, timeout, what)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Broker:
    """One `manage.py runbroker` process."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    worker_port: int = field(default_factory=free_port)
    requester_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def worker_url(self) -> str:
        return f"ws://{self.host}:{self.worker_port}"

    @property
    def requester_url(self) -> str:
        return f"ws://{self.host}:{self.requester_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"broker-{self.http_port}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> Broker:
        env = {**os.environ, **FAST_ENV,
               "DATABASE_URL": os.environ.get("TEST_BROKER_DATABASE_URL")
               or f"sqlite:///{self.workdir / 'broker.sqlite3'}",
               **self.env}
        cmd = [sys.executable, "manage.py", "runbroker", "--host", self.host,
               "--worker-port", str(self.worker_port), "--requester-port",
               str(self.requester_port), "--http-port", str(self.http_port), *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log_path.open("ab"),
                                     stderr=subprocess.STDOUT)
        wait_for(self._healthy, timeout, f"broker /healthz\n{self.log()}")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
        return self.get("/healthz")["status"] == "ok"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=5) as resp:
            return json.load(resp)

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.http_url + path, timeout=5) as resp:
            return resp.read().decode()

    def workers(self) -> list[dict[str, Any]]:
        return self.get("/api/workers")["workers"]

    def workers_as(self, token: str) -> list[dict[str, Any]]:
        """The worker list, with an admin key (needed once credentials exist)."""
        request = urllib.request.Request(self.http_url + "/api/workers",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.load(resp)["workers"]

    def wait_workers(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.workers()) == n, timeout, f"{n} workers online")
        return self.workers()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)

    def manage(self, *args: str, timeout: float = 60.0, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a management command against this broker."""
        env = {**os.environ, "BROKER_URL": self.http_url,
               "DATABASE_URL": f"sqlite:///{self.workdir / 'broker.sqlite3'}", **(env or {})}
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                              input=input, capture_output=True, text=True, timeout=timeout)


@dataclass
class WorkerProc:
    """One `python -m workers HOST PORT` process."""

    broker: Broker
    name: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.broker.workdir / f"worker-{self.name}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> WorkerProc:
        cmd = [sys.executable, "-m", "workers", self.broker.host, str(self.broker.worker_port),
               "--name", self.name, *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log_path.open("ab"),
                                     stderr=subprocess.STDOUT)
        return self

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
