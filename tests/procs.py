"""Real processes for integration tests: a daphne broker and `python -m workers`.

Ports: a broker is started with port 0 on each of its sockets and ``--ports-file``;
it binds what the system gives it and writes the ports it holds once it listens,
and the harness reads them from there. No port is guessed in the test process and
handed to a child, so two tests can never race for one, and a broker that cannot
listen exits 1 at once (the harness fails the test with its log instead of
waiting). A broker restarted by a test asks for the ports it had.

Databases: every broker on SQLite starts from a copy of one migrated template (made
once per test session) with ``--no-migrate``.

Every wait is bounded, so a broken build fails fast instead of hanging CI; on a
slow machine ``TEST_TIME_FACTOR`` (default 1) multiplies every bound (and the
tests' timeouts, see conftest.py).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent

#: Multiplies every bounded wait of the tests (``TEST_TIME_FACTOR=3`` on a slow or
#: busy machine). Thresholds that tests assert are not scaled: they are the promise.
TIME_FACTOR = float(os.environ.get("TEST_TIME_FACTOR") or 1)


def scaled(seconds: float) -> float:
    """A bound on a wait, on this machine."""
    return seconds * TIME_FACTOR


#: Fast heartbeats so that failure detection takes a second, not fifteen.
FAST_ENV = {"BROKER_HEARTBEAT_INTERVAL": "0.5", "BROKER_HEARTBEAT_MISSES": "3",
            "BROKER_HISTORY_FLUSH_SECONDS": "0.2"}

_names = itertools.count(1)


def free_port() -> int:
    """A port that was free a moment ago, for what cannot bind port 0 itself (another
    process may take it before it is used: prefer ``Broker``'s port 0, or
    :func:`closed_port` for a port nobody listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port held (bound, not listening) for the block: connecting to it is refused,
    and nothing else can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def free_port_rows(count: int, step: int, rows: int) -> list[int]:
    """``count`` ports p such that p, p + step, ... (``rows`` of them) are all free now.

    For ``runbroker --processes``, whose process i listens on each port + i x step: a
    port the OS said was free says nothing about the one ``step`` above it. They may
    be taken before the broker binds them; it then exits at once, saying so.
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
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` (times
    ``TEST_TIME_FACTOR``). Other exceptions of the predicate count as "not yet", but a
    failed assertion (or ``pytest.fail``: a process it watches is gone) ends the wait
    at once."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - polling a service that is coming up
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} "
                       f"(last error: {last_error})")


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
                ) -> Any:
    """:func:`wait_for` for async tests: polls in a thread so the event loop keeps running."""
    return await asyncio.to_thread(wait_for, predicate, timeout, what)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --------------------------------------------------------------------------- database

_template_lock = threading.Lock()
_template: Path | None = None


def migrated_template() -> Path:
    """A migrated SQLite database, made once per test process; brokers start from copies."""
    global _template
    with _template_lock:
        if _template is None:
            directory = Path(tempfile.mkdtemp(prefix="broker-template-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            path = directory / "template.sqlite3"
            env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}"}
            done = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT,
                                  env=env, capture_output=True, text=True,
                                  timeout=scaled(120))
            if done.returncode != 0:
                raise RuntimeError(f"migrating the template database failed:\n{done.stderr}")
            _template = path
        return _template


# --------------------------------------------------------------------------- processes

#: Runs ``manage.py`` commands one after the other in one process (see
#: :meth:`Broker.manage_many`): argv lists in, one result per command out, as JSON.
MANAGE_MANY = r"""
import contextlib, io, json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
from django.core.management import ManagementUtility
results = []
for argv in json.load(sys.stdin):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ManagementUtility(["manage.py", *argv]).execute()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            import traceback
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
sys.__stdout__.write(json.dumps(results))
"""


def manage_many(commands: list[list[str]], env: dict[str, str] | None = None,
                timeout: float = 60.0) -> list[subprocess.CompletedProcess]:
    """``python manage.py ARGS`` for each of ``commands``, in one process (one Django
    start instead of one each); returns what each would have returned."""
    done = subprocess.run([sys.executable, "-c", MANAGE_MANY], cwd=ROOT,
                          env={**os.environ, **(env or {})}, input=json.dumps(commands),
                          capture_output=True, text=True, timeout=scaled(timeout))
    if done.returncode != 0:
        raise RuntimeError(f"manage_many failed:\n{done.stdout}\n{done.stderr}")
    return [subprocess.CompletedProcess(["manage.py", *argv], r["returncode"], r["stdout"],
                                        r["stderr"])
            for argv, r in zip(commands, json.loads(done.stdout))]


@dataclass
class Broker:
    """One `manage.py runbroker` process.

    Ports left at 0 are chosen by the broker when it first starts, and kept for its
    restarts. ``log()`` is the broker's output since ``mark_log()`` (its start, unless
    a shared broker is handed to another test).
    """

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    worker_port: int = 0
    requester_port: int = 0
    http_port: int = 0
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    name: str = field(default_factory=lambda: str(next(_names)))
    log_offset: int = 0
    #: Its open-files limit (soft and hard), if lower than this process's.
    open_files: int | None = None
    #: Worker processes started against it (a shared broker stops them after each test).
    children: list[WorkerProc] = field(default_factory=list, repr=False)

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
        return self.workdir / f"broker-{self.name}.log"

    @property
    def db_path(self) -> Path:
        return self.workdir / "broker.sqlite3"

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def mark_log(self) -> None:
        """From now on ``log()`` shows only what the broker writes after this."""
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    def _limit_files(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Broker:
        args = list(self.args)
        test_db = os.environ.get("TEST_BROKER_DATABASE_URL")
        env = {**os.environ, **FAST_ENV,
               "DATABASE_URL": test_db or f"sqlite:///{self.db_path}", **self.env}
        if not test_db and "DATABASE_URL" not in self.env and "--no-migrate" not in args:
            if not self.db_path.exists():  # brokers of one test share their database
                partial = self.db_path.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(migrated_template(), partial)
                os.replace(partial, self.db_path)
            args.append("--no-migrate")
        ports_file = self.workdir / f"broker-{self.name}.ports.json"
        ports_file.unlink(missing_ok=True)
        if "--host" not in args:
            args = ["--host", self.host, *args]
        cmd = [sys.executable, "manage.py", "runbroker",
               "--worker-port", str(self.worker_port),
               "--requester-port", str(self.requester_port),
               "--http-port", str(self.http_port), "--ports-file", str(ports_file), *args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=self._limit_files if self.open_files
                                         else None)

        def listening() -> dict[str, int] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            if ports_file.exists():
                return json.loads(ports_file.read_text())
            return None

        try:
            ports = wait_for(listening, timeout, "the broker to listen", interval=0.02)
            self.worker_port, self.requester_port, self.http_port = \
                ports["worker"], ports["requester"], ports["http"]
            wait_for(self._healthy, timeout, "the broker's /healthz", interval=0.02)
        except TimeoutError as exc:
            self.stop(signal.SIGKILL)
            raise TimeoutError(f"{exc}\n{self.log()}") from None
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
        return self.get("/healthz")["status"] == "ok"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=scaled(5)) as resp:
            return json.load(resp)

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.http_url + path, timeout=scaled(5)) as resp:
            return resp.read().decode()

    def workers(self) -> list[dict[str, Any]]:
        return self.get("/api/workers")["workers"]

    def workers_as(self, token: str) -> list[dict[str, Any]]:
        """The worker list, with an admin key (needed once credentials exist)."""
        request = urllib.request.Request(self.http_url + "/api/workers",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=scaled(5)) as resp:
            return json.load(resp)["workers"]

    def wait_workers(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.workers()) == n, timeout, f"{n} workers online")
        return self.workers()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)

    def manage_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "BROKER_URL": self.http_url,
                "DATABASE_URL": f"sqlite:///{self.db_path}", **(env or {})}

    def manage(self, *args: str, timeout: float = 60.0, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a management command against this broker."""
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT,
                              env=self.manage_env(env), input=input, capture_output=True,
                              text=True, timeout=scaled(timeout))

    def manage_many(self, *commands: list[str], env: dict[str, str] | None = None
                    ) -> list[subprocess.CompletedProcess]:
        """Several management commands against this broker, in one process."""
        return manage_many(list(commands), self.manage_env(env))

    def tokens(self, *commands: list[str]) -> list[str]:
        """``manage.py token COMMAND...`` for each (``["create", "worker", "fleet"]``,
        ``["revoke", "gone"]``), in order, in one process; each must succeed. Returns
        what each printed (the tokens). The broker sees them at its next reload: end
        with an admin key and :meth:`wait_credentials` for it."""
        done = self.manage_many(*(["token", *command] for command in commands))
        for result in done:
            assert result.returncode == 0, (result.args, result.stderr)
        return [result.stdout.strip() for result in done]

    def accepts(self, admin_key: str) -> bool:
        """Whether the control API takes ``admin_key`` now."""
        try:
            self.workers_as(admin_key)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return False
            raise
        return True

    def wait_credentials(self, admin_key: str, timeout: float = 10.0) -> None:
        """Until the broker accepts ``admin_key``: what was created or revoked before it
        is loaded too (the broker reloads every credential in one query)."""
        wait_for(lambda: self.accepts(admin_key), timeout,
                 "the broker to load the new credentials")


@dataclass
class WorkerProc:
    """One `python -m workers HOST PORT` process."""

    broker: Broker
    name: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    serial: int = field(default_factory=lambda: next(_names))

    @property
    def log_path(self) -> Path:
        return self.broker.workdir / f"worker-{self.name}-{self.serial}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> WorkerProc:
        cmd = [sys.executable, "-m", "workers", self.broker.host, str(self.broker.worker_port),
               "--name", self.name, *self.args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.broker.children.append(self)
        return self

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            _stop(self.proc, sig)
