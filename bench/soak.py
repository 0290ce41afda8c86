"""Soak test: a two-process broker cluster under moderate load and steady chaos.

``python -m bench.soak --duration 600`` starts, on 127.0.0.1 only:

* 2 ``manage.py runbroker`` processes sharing one Redis (``$REDIS_URL`` or
  ``redis://127.0.0.1:6379/0``) under a key prefix of their own, and SQLite in a
  scratch directory (or ``$DATABASE_URL``);
* 6 ``python -m workers`` processes with ``--handlers tests.sample_handlers``, each
  given every broker's worker URL so that it reconnects to another broker when its
  own dies;
* 2 requester connections per broker, driven by 8 concurrent request loops: ``slow``
  with a random 0-50 ms duration (and some ``echo``), each with a unique request id
  and a 10 s timeout.

While the load runs, chaos: every 3-8 s a random worker is killed with SIGKILL and
restarted 1 s later; about every 60 s one broker process is killed with SIGKILL and
restarted on the same ports 2 s later (never the last one alive). A requester
connection whose broker died reconnects to any live broker and attaches to each of
its requests in flight (``{"attach": id}``); one the cluster does not know (it never
arrived) is sent again, with its id. Once its own broker is back, the connection
drains and moves back there, so that later broker kills keep cutting connections.

The client here is a raw WebSocket reader, not ``workers.requester.Requester``: that
class drops answers it does not expect, and a soak must see every frame to count
duplicates. Every answer is checked: exactly one per request id, on the connection
that sent it, and carrying that request's own payload.

At the end the chaos stops, requests in flight finish, and a table goes to stdout and
to ``bench/results/soak.md``. Exit status: 0 when every request on a live connection
got exactly one, matching answer; 1 when there were duplicates, requests never
answered on a live connection, or answers carrying another request's payload; 2 when
the cluster could not be set up; 130 on Ctrl-C (a partial report is still written).
Every process the soak started is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

try:
    import psutil
except ImportError:  # pragma: no cover - bench/requirements.txt has it; /proc is enough
    psutil = None

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the only address the soak ever listens on or dials
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
DEFAULT_OUT = ROOT / "bench" / "results" / "soak.md"
#: Beyond the request's own timeout, how long we wait before calling it unanswered
#: (the broker answers "Worker response timeout" itself at the timeout).
MARGIN = 5.0
HANDLERS = "tests.sample_handlers"


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Soak the broker: a cluster of runbroker processes over Redis, workers "
                    "that reconnect between them, moderate request load, and chaos (kill -9 "
                    "of random workers every few seconds and of a broker process about every "
                    "minute). Reports requests sent / ok / errors (by text) / re-attached "
                    "after a reconnect / duplicates / never answered, broker RSS and Redis keys "
                    "over time, and the kills; writes the table to --out. Exits 1 if any request "
                    "got two answers, an answer with another request's payload, or no "
                    "answer on a connection that stayed up; 2 if the cluster could not "
                    "start. Everything runs on 127.0.0.1 and is killed on exit.")
    add = parser.add_argument
    add("--duration", type=float, default=600.0, help="seconds of load and chaos")
    add("--brokers", type=int, default=2, help="broker processes")
    add("--workers", type=int, default=6, help="worker processes")
    add("--connections-per-broker", type=int, default=2, help="requester connections per broker")
    add("--concurrency", type=int, default=8,
        help="request loops, each with one request in flight, spread over the connections")
    add("--max-slow-ms", type=float, default=50.0,
        help="'slow' requests sleep a random 0..this many milliseconds")
    add("--echo-share", type=float, default=0.15, help="share of requests that are 'echo'")
    add("--request-timeout", type=float, default=10.0,
        help="'timeout' sent with every request; an answer is awaited this + 5 s")
    add("--worker-kill", type=float, nargs=2, default=[3.0, 8.0], metavar=("MIN", "MAX"),
        help="seconds between worker kills, uniformly at random")
    add("--worker-restart-delay", type=float, default=1.0,
        help="seconds before a killed worker is started again")
    add("--broker-kill-every", type=float, default=60.0,
        help="about this many seconds (+-10%%) between broker kills; 0: never")
    add("--broker-restart-delay", type=float, default=2.0,
        help="seconds before a killed broker is started again on the same ports")
    add("--no-chaos", action="store_true", help="no kills at all: a baseline run")
    add("--sample-every", type=float, default=30.0,
        help="seconds between samples of broker RSS and Redis keys")
    add("--heartbeat-interval", type=float, default=1.0,
        help="BROKER_HEARTBEAT_INTERVAL for the brokers (3 misses): how fast the survivor "
             "gives up on the workers of a killed broker; the broker default is 5")
    add("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis shared by the brokers (default $REDIS_URL or redis://127.0.0.1:6379/0); "
             "only keys under a fresh BROKER_REDIS_PREFIX are used, and deleted at the end")
    add("--database-url", default=os.environ.get("DATABASE_URL"),
        help="the brokers' database (default $DATABASE_URL, else SQLite in --workdir)")
    add("--workdir", type=Path, default=None,
        help="where logs and the SQLite database go (default: a new temporary directory, "
             "kept after the run)")
    add("--out", type=Path, default=DEFAULT_OUT, help="Markdown report")
    add("--seed", type=int, default=None, help="random seed for the chaos and the load")
    return parser


def check_loopback(url: str, what: str) -> None:
    """Refuse anything but 127.0.0.1: the soak kills things and must stay on this machine."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        return
    if (parsed.hostname or "") not in LOOPBACK:
        raise SystemExit(f"{what} {url!r} is not on 127.0.0.1; the soak only targets this "
                         f"machine")


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Children get SIGKILL if the soak itself is killed (Linux; best effort elsewhere)."""
    os.setsid()  # Ctrl-C in the terminal reaches the soak only; it kills the rest
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a child in its own session, output appended to ``log_path``.

    Called on the event loop's thread only: PR_SET_PDEATHSIG fires when the thread
    that forked exits, so forking from a pool thread could kill children early.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


def hard_kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        if psutil is not None:
            return psutil.Process(pid).memory_info().rss / 2**20
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except Exception:  # noqa: BLE001 - the process may have just been killed
        return None
    return None


def http_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


@dataclass
class BrokerSlot:
    """One broker process, always on the same three ports, restarted after each kill."""

    index: int
    workdir: Path
    env: dict[str, str]
    migrate: bool
    worker_port: int = field(default_factory=free_port)
    requester_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    up: bool = False
    starts: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"broker-{self.index}"

    @property
    def worker_url(self) -> str:
        return f"ws://{HOST}:{self.worker_port}/"

    @property
    def requester_url(self) -> str:
        return f"ws://{HOST}:{self.requester_port}/"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def spawn(self) -> None:
        cmd = [sys.executable, "manage.py", "runbroker", "--host", HOST,
               "--worker-port", str(self.worker_port),
               "--requester-port", str(self.requester_port), "--http-port", str(self.http_port)]
        if not (self.migrate and self.starts == 0):
            cmd.append("--no-migrate")
        with self.log_path.open("a") as log:
            log.write(f"\n===== soak: start #{self.starts + 1} at "
                      f"{datetime.now().isoformat(timespec='seconds')} =====\n")
        self.proc = spawn(cmd, self.env, self.log_path)
        self.starts += 1
        self.pids.append(self.proc.pid)

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return http_json(self.http_url + "/healthz", 2.0).get("status") == "ok"
        except Exception:  # noqa: BLE001 - coming up, or dead
            return False

    async def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            if await asyncio.to_thread(self.healthy):
                self.up = True
                return True
            await asyncio.sleep(0.2)
        return False

    def kill(self) -> None:
        self.up = False
        hard_kill(self.proc)


@dataclass
class WorkerSlot:
    index: int
    workdir: Path
    urls: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"soak-w{self.index}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "workers", self.urls[0]]
        for url in self.urls[1:]:
            cmd += ["--url", url]
        cmd += ["--name", self.name, "--handlers", HANDLERS, "--log-level", "INFO"]
        self.proc = spawn(cmd, self.env, self.log_path)

    def kill(self) -> None:
        hard_kill(self.proc)


# --------------------------------------------------------------------------- bookkeeping

class SoakBug(Exception):
    """The soak itself went wrong (not the broker)."""


#: Seconds a request may wait beyond its timeout while its connection comes back.
RECONNECT_ALLOWANCE = 30.0


class Rec:
    """One request: where it went and how many answers it got."""

    __slots__ = ("conn", "gen", "command", "expect", "answers", "state", "sent_at", "frame")

    def __init__(self, conn: int, gen: int, command: str, expect: Any, frame: str) -> None:
        self.conn, self.gen, self.command, self.expect = conn, gen, command, expect
        self.frame = frame  # sent again if, re-attached, the cluster does not know it
        self.answers = 0
        self.state = "pending"  # -> ok | error | unanswered
        self.sent_at = time.monotonic()


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    unanswered: int = 0
    late: int = 0              # an answer after we had given up waiting for it
    unknown: int = 0           # an answer naming no request of ours
    misrouted: int = 0         # an answer on another connection than the request's
    wrong_payload: int = 0     # a success carrying something else than its request's data
    reconnects: int = 0
    reattached: int = 0        # requests in flight attached to again after a reconnect
    resent: int = 0            # of those, unknown to the cluster, and sent again
    moved_home: int = 0
    disconnects: int = 0
    worker_kills: int = 0
    broker_kills: int = 0
    broker_restart_failures: int = 0
    latencies: list[float] = field(default_factory=list)
    served_by: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def example(self, kind: str, text: str, keep: int = 5) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < keep:
            bucket.append(text)


def normalise(text: str) -> str:
    """Error or log text with ids, addresses and numbers blanked, to group alike ones."""
    text = re.sub(r"soak-[0-9a-f]+-\d+", "<rid>", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", text)
    text = re.sub(r"\b(?=[0-9a-f]*\d)[0-9a-f]{6,}\b", "<id>", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "<loopback>:<port>", text)
    text = re.sub(r"127\.0\.0\.1", "<loopback>", text)
    text = re.sub(r"\b\d+(\.\d+)?", "N", text)
    return text.strip()


# --------------------------------------------------------------------------- requesters


class Conn:
    """One requester connection that re-dials (home broker first) whenever it drops.

    Away from home (its broker was killed), it goes back once the home broker is up
    again: it stops taking requests, lets those in flight be answered, closes, and
    dials home. Without that, every connection would end up on whichever broker was
    killed least recently, and broker kills would stop cutting requester connections.
    """

    def __init__(self, soak: Soak, index: int, home: int) -> None:
        self.soak, self.index, self.home = soak, index, home
        self.ws: ClientConnection | None = None
        self.gen = 0
        self.ready = asyncio.Event()
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.broker: int | None = None
        self.moving_home = False

    async def run(self) -> None:
        while not self.soak.closing:
            ws = await self._dial()
            if ws is None:
                await asyncio.sleep(0.2)
                continue
            self.ws, self.gen, self.moving_home = ws, self.gen + 1, False
            if self.gen > 1:
                self.soak.stats.reconnects += 1
                await self._reattach(ws)
            homing = (asyncio.create_task(self._go_home(ws)) if self.broker != self.home
                      else None)
            self.ready.set()
            try:
                async for raw in ws:
                    self.soak.on_frame(self, raw)
            except ConnectionClosed:
                pass
            finally:
                if homing is not None:
                    homing.cancel()
                self.ready.clear()
                self.ws = None
                pending = self.pending  # kept: re-attached on the next connection
                if self.soak.closing:
                    pass
                elif self.moving_home and not pending:
                    self.soak.stats.moved_home += 1
                else:
                    self.soak.stats.disconnects += 1

    async def _reattach(self, ws: ClientConnection) -> None:
        for rid in list(self.pending):
            record = self.soak.records[rid]
            record.gen = self.gen
            self.soak.stats.reattached += 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"attach": rid}))

    async def _go_home(self, ws: ClientConnection) -> None:
        """Once the home broker is back: take no new requests, drain, close (then re-dial)."""
        home = self.soak.brokers[self.home]
        while not home.up:
            await asyncio.sleep(0.5)
        self.moving_home = True
        self.ready.clear()  # the request loops wait
        deadline = time.monotonic() + self.soak.args.request_timeout + MARGIN + 5
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await ws.close()

    async def _dial(self) -> ClientConnection | None:
        slots = self.soak.brokers
        order = [self.home] + [i for i in range(len(slots)) if i != self.home]
        for i in order:
            try:
                ws = await connect(slots[i].requester_url, open_timeout=3, max_size=2**24,
                                   ping_interval=None)
            except (OSError, TimeoutError, InvalidHandshake):
                continue
            self.broker = i
            return ws
        return None

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"soak-{self.run_id}"
        self.workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.brokers: list[BrokerSlot] = []
        self.workers: list[WorkerSlot] = []
        self.conns: list[Conn] = []
        self.records: dict[str, Rec] = {}
        self.stats = Stats()
        self.samples: list[dict[str, Any]] = []
        self.key_kinds: list[dict[str, list[int]]] = []
        self.events: list[str] = []
        self.closing = False
        self.interrupted = False
        self.setup_error: str | None = None
        self.started_at = 0.0
        self.load_seconds = 0.0
        self.seq = 0
        self.redis = redis.Redis.from_url(args.redis_url, socket_connect_timeout=3,
                                          socket_timeout=10)

    # ---- logging

    def t(self) -> float:
        return time.monotonic() - self.started_at if self.started_at else 0.0

    def event(self, text: str) -> None:
        line = f"[{self.t():7.1f}s] {text}"
        self.events.append(line)
        print(line, flush=True)

    # ---- set-up

    async def setup(self) -> None:
        args = self.args
        self.redis.ping()
        database = args.database_url or f"sqlite:///{self.workdir / 'broker.sqlite3'}"
        env = {**os.environ, "REDIS_URL": args.redis_url, "BROKER_REDIS_PREFIX": self.prefix,
               "DATABASE_URL": database, "BROKER_HOST": HOST,
               "BROKER_HEARTBEAT_INTERVAL": str(args.heartbeat_interval),
               "BROKER_HEARTBEAT_MISSES": "3", "BROKER_LOG_LEVEL": "INFO",
               "BROKER_TIMEOUT": str(args.request_timeout), "PYTHONUNBUFFERED": "1"}
        env.pop("BROKER_API_TOKEN", None)  # a fresh database has no credentials: loopback only
        self.brokers = [BrokerSlot(i, self.workdir, env, migrate=(i == 0))
                        for i in range(args.brokers)]
        for slot in self.brokers:  # one at a time: only the first migrates
            slot.spawn()
            if not await slot.wait_healthy(60):
                raise RuntimeError(f"{slot.name} did not come up:\n{tail(slot.log_path)}")
        self.event(f"{len(self.brokers)} brokers up: "
                   + ", ".join(f"{b.name} pid {b.proc.pid} http {b.http_port}"
                               for b in self.brokers))
        worker_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        worker_env.pop("BROKER_TOKEN", None)
        n = len(self.brokers)
        for i in range(args.workers):
            urls = [self.brokers[(i + k) % n].worker_url for k in range(n)]
            slot = WorkerSlot(i, self.workdir, urls, worker_env)
            slot.spawn()
            self.workers.append(slot)
        deadline = time.monotonic() + 30
        while len(await self.listed_workers()) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(await self.listed_workers())} of "
                                   f"{args.workers} workers registered:\n"
                                   f"{tail(self.workers[0].log_path)}")
            await asyncio.sleep(0.2)
        self.event(f"{args.workers} workers registered")
        for b in range(n):
            for _ in range(args.connections_per_broker):
                self.conns.append(Conn(self, len(self.conns), b))

    async def listed_workers(self) -> list[dict[str, Any]]:
        """The cluster's worker list, as any live broker reports it."""
        for slot in self.brokers:
            if slot.up:
                try:
                    data = await asyncio.to_thread(http_json, slot.http_url + "/api/workers")
                    return data["workers"]
                except Exception:  # noqa: BLE001 - it may be being killed right now
                    continue
        return []

    # ---- load

    def on_frame(self, conn: Conn, raw: str | bytes) -> None:
        stats = self.stats
        try:
            obj = json.loads(raw)
            rid = obj.get("request_id")
        except (ValueError, AttributeError):
            stats.unknown += 1
            stats.example("unknown", repr(raw)[:200])
            return
        rec = self.records.get(rid) if isinstance(rid, str) else None
        if rec is None:
            stats.unknown += 1
            stats.example("unknown", repr(raw)[:200])
            return
        if obj.get("code") == "unknown_request" and rid in conn.pending and conn.ws:
            stats.resent += 1  # re-attached, and it never arrived: it goes now
            asyncio.ensure_future(conn.ws.send(rec.frame))
            return
        rec.answers += 1
        if rec.answers > 1:
            stats.duplicates += 1
            stats.example("duplicate", f"{rid} answer #{rec.answers} on conn {conn.index} "
                          f"(was {rec.state}): {str(raw)[:200]}")
            self.event(f"DUPLICATE answer for {rid}: {str(raw)[:200]}")
            return
        if rec.conn != conn.index or rec.gen != conn.gen:
            stats.misrouted += 1
            stats.example("misrouted", f"{rid} sent on conn {rec.conn} gen {rec.gen}, "
                          f"answered on conn {conn.index} gen {conn.gen}")
        if rec.state == "unanswered":
            stats.late += 1
            stats.example("late", f"{rid} after {time.monotonic() - rec.sent_at:.1f}s: "
                          f"{str(raw)[:200]}")
            return
        future = conn.pending.get(rid)
        if future is not None and not future.done():
            future.set_result(obj)

    def next_request(self, conn: Conn) -> tuple[str, str, dict[str, Any], Any]:
        self.seq += 1
        rid = f"soak-{self.run_id}-{self.seq}"
        if self.rng.random() < self.args.echo_share:
            return rid, "echo", {"message": rid}, f"Echo: {rid}"
        seconds = round(self.rng.uniform(0, self.args.max_slow_ms) / 1000, 4)
        return rid, "slow", {"seconds": seconds, "tag": rid}, rid

    async def load_loop(self, k: int, stop: asyncio.Event) -> None:
        conn = self.conns[k % len(self.conns)]
        stats, timeout = self.stats, self.args.request_timeout
        while not stop.is_set():
            if not conn.ready.is_set() or conn.ws is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.ready.wait(), 0.5)
                continue
            ws = conn.ws
            rid, command, data, expect = self.next_request(conn)
            frame = json.dumps({"request_id": rid, "command": command, "data": data,
                                "timeout": timeout})
            rec = Rec(conn.index, conn.gen, command, expect, frame)
            self.records[rid] = rec
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            conn.pending[rid] = future
            stats.sent += 1
            with contextlib.suppress(ConnectionClosed):  # re-attached once reconnected
                await ws.send(frame)
            try:
                # Across reconnects: the time a restart takes, beside its own timeout.
                answer = await asyncio.wait_for(asyncio.shield(future),
                                                timeout + MARGIN + RECONNECT_ALLOWANCE)
            except TimeoutError:
                answer = None
            conn.pending.pop(rid, None)
            if answer is None:
                rec.state = "unanswered"
                stats.unanswered += 1
                stats.example("unanswered", f"{rid} ({command} {data}) on conn {conn.index} "
                              f"to {self.brokers[conn.broker or 0].name}")
                self.event(f"UNANSWERED {rid} on a live connection to "
                           f"{self.brokers[conn.broker or 0].name} after {timeout + MARGIN}s")
            elif answer.get("success"):
                rec.state = "ok"
                got = answer.get("data")
                got = got.get("tag") if command == "slow" and isinstance(got, dict) else got
                if got != expect:
                    stats.wrong_payload += 1
                    stats.example("wrong payload", f"{rid}: {json.dumps(answer)[:200]}")
                else:
                    stats.ok += 1
                    stats.latencies.append(time.monotonic() - rec.sent_at)
                    stats.served_by[str(answer.get("processed_by"))] += 1
            else:
                rec.state = "error"
                stats.errors[normalise(str(answer.get("error")))] += 1

    # ---- chaos

    async def sleep_or_stop(self, seconds: float, stop: asyncio.Event) -> bool:
        """Sleep; True if ``stop`` was set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    async def kill_workers(self, stop: asyncio.Event) -> None:
        low, high = self.args.worker_kill
        while not await self.sleep_or_stop(self.rng.uniform(low, high), stop):
            slot = self.rng.choice(self.workers)
            pid = slot.proc.pid if slot.proc else None
            slot.kill()
            self.stats.worker_kills += 1
            self.event(f"kill -9 worker {slot.name} (pid {pid})")
            await asyncio.sleep(self.args.worker_restart_delay)  # not cut short by stop
            slot.spawn()

    async def kill_brokers(self, stop: asyncio.Event) -> None:
        every = self.args.broker_kill_every
        while not await self.sleep_or_stop(self.rng.uniform(0.9 * every, 1.1 * every), stop):
            live = [b for b in self.brokers if b.up]
            if len(live) < 2:  # keep at least one broker alive at all times
                self.event("broker kill skipped: fewer than two brokers are up")
                continue
            slot = self.rng.choice(live)
            pid = slot.proc.pid if slot.proc else None
            slot.kill()
            self.stats.broker_kills += 1
            self.event(f"kill -9 {slot.name} (pid {pid})")
            await asyncio.sleep(self.args.broker_restart_delay)  # not cut short by stop
            await self.restart_broker(slot)

    async def restart_broker(self, slot: BrokerSlot) -> None:
        for attempt in range(1, 6):
            slot.spawn()
            if await slot.wait_healthy(60):
                self.event(f"{slot.name} back (pid {slot.proc.pid}, attempt {attempt})")
                return
            self.stats.broker_restart_failures += 1
            self.event(f"{slot.name} did not come back (attempt {attempt}): "
                       f"{tail(slot.log_path, 3)}")
            slot.kill()
            await asyncio.sleep(2)
        self.event(f"{slot.name} given up: the soak goes on with the others")

    # ---- sampling

    def redis_usage(self) -> tuple[int, int]:
        """(keys, bytes) under our prefix; also keeps the breakdown by kind of key."""
        keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
        size = 0
        kinds: dict[str, list[int]] = {}
        for key in keys:
            with contextlib.suppress(redis.RedisError):
                used = self.redis.memory_usage(key) or 0
                size += used
                kind = normalise(key.decode(errors="replace")[len(self.prefix) + 1:])
                entry = kinds.setdefault(kind, [0, 0, 0])
                entry[0] += 1
                entry[1] += used
                entry[2] += self.members(key)
        self.key_kinds.append(kinds)
        return len(keys), size

    def members(self, key: bytes) -> int:
        """Elements of a Redis key (1 for a string): growth inside one key shows here."""
        size = {b"zset": self.redis.zcard, b"set": self.redis.scard, b"hash": self.redis.hlen,
                b"list": self.redis.llen}.get(self.redis.type(key))
        return size(key) if size else 1

    async def sample(self) -> None:
        row: dict[str, Any] = {"t": self.t()}
        for slot in self.brokers:
            alive = slot.up and slot.proc is not None and slot.proc.poll() is None
            row[slot.name] = (slot.proc.pid, rss_mb(slot.proc.pid)) if alive else None
        try:
            row["keys"], row["bytes"] = await asyncio.to_thread(self.redis_usage)
        except redis.RedisError as exc:
            row["keys"], row["bytes"] = None, None
            self.event(f"Redis sample failed: {exc}")
        row["listed"] = len(await self.listed_workers())
        row["in_flight"] = sum(len(c.pending) for c in self.conns)
        row["load"] = os.getloadavg()[0]  # the machine may be shared: context for latencies
        self.samples.append(row)
        rss = "  ".join(f"{b.name} {row[b.name][1]:.0f}MB" if row[b.name] and row[b.name][1]
                        else f"{b.name} down" for b in self.brokers)
        self.event(f"sample: {rss}  redis keys {row['keys']} ({row['bytes']} B)  "
                   f"workers listed {row['listed']}  sent {self.stats.sent} ok {self.stats.ok} "
                   f"reattached {self.stats.reattached} errors "
                   f"{sum(self.stats.errors.values())} "
                   f"dup {self.stats.duplicates} unanswered {self.stats.unanswered}")

    async def sampler(self, stop: asyncio.Event) -> None:
        while not await self.sleep_or_stop(self.args.sample_every, stop):
            await self.sample()

    # ---- the run

    async def run(self) -> None:
        args = self.args
        await self.setup()
        readers = [asyncio.create_task(c.run(), name=f"conn-{c.index}") for c in self.conns]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.conns)), 10)
            self.started_at = time.monotonic()
            self.event(f"load: {args.concurrency} loops over {len(self.conns)} connections, "
                       f"{args.duration:.0f}s; prefix {self.prefix}; logs in {self.workdir}")
            await self.sample()
            stop_load, stop_chaos = asyncio.Event(), asyncio.Event()
            loops = [asyncio.create_task(self.load_loop(k, stop_load))
                     for k in range(args.concurrency)]
            background = [asyncio.create_task(self.sampler(stop_chaos))]
            if not args.no_chaos:
                background.append(asyncio.create_task(self.kill_workers(stop_chaos)))
                if args.broker_kill_every > 0 and len(self.brokers) > 1:
                    background.append(asyncio.create_task(self.kill_brokers(stop_chaos)))
            try:
                await asyncio.sleep(args.duration)
                self.event("chaos stops; waiting for restarts to finish")
                stop_chaos.set()
                await self.settle(background, 5 * 60 + 30, "chaos")
                self.event("load stops; letting requests in flight finish")
                stop_load.set()
                self.load_seconds = self.t()
                await self.settle(loops, args.request_timeout + MARGIN + 10, "request loops")
                await self.sample()
            finally:
                for task in loops + background:
                    task.cancel()
                await asyncio.gather(*loops, *background, return_exceptions=True)
        finally:
            self.closing = True
            await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def settle(self, tasks: list[asyncio.Task[Any]], timeout: float, what: str) -> None:
        """Wait (bounded) for tasks to end; a crash in one is a bug of the soak: raise it."""
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            self.event(f"{len(pending)} {what} still running after {timeout:.0f}s: cancelled")
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise SoakBug(f"{what} crashed") from task.exception()

    def teardown(self) -> None:
        """Kill every process we started, and delete our Redis keys."""
        self.closing = True
        for slot in self.workers:
            slot.kill()
        for slot in self.brokers:
            slot.kill()
        try:
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                self.redis.delete(*keys[i:i + 500])
        except redis.RedisError:
            pass  # every key carries a TTL: nothing stays for good

    @property
    def failed(self) -> bool:
        s = self.stats
        return bool(s.duplicates or s.unanswered or s.wrong_payload)


# --------------------------------------------------------------------------- report


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>WARNING|ERROR|CRITICAL)\s+(?P<rest>.*)$")


def scan_logs(paths: list[Path]) -> tuple[Counter[str], Counter[str]]:
    """(count per level incl. tracebacks, count per normalised WARNING/ERROR message)."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Traceback"):
                levels["Traceback"] += 1
            match = LOG_LINE.match(line)
            if match:
                levels[match["level"]] += 1
                text = normalise(match["rest"])
                if len(text) > 200:  # keep both ends: daphne puts the point at the end
                    text = f"{text[:90]} ... {text[-100:]}"
                messages[f"{match['level']} {text}"] += 1
    return levels, messages


def first_max_last(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{values[0]:.0f} / {max(values):.0f} / {values[-1]:.0f}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(soak: Soak) -> str:
    args, s = soak.args, soak.stats
    errors = sum(s.errors.values())
    status = ("INTERRUPTED (partial)" if soak.interrupted
              else f"SETUP FAILED: {soak.setup_error}" if soak.setup_error
              else "FAIL" if soak.failed else "PASS")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Soak: {status}", "",
           f"{when}; `python -m bench.soak --duration {args.duration:g}`: "
           f"{args.brokers} runbroker processes over Redis (prefix `{soak.prefix}`), "
           f"{args.workers} workers (`--handlers {HANDLERS}`, every broker's URL), "
           f"{len(soak.conns)} requester connections, {args.concurrency} request loops "
           f"(`slow` 0-{args.max_slow_ms:g} ms, {args.echo_share:.0%} `echo`, timeout "
           f"{args.request_timeout:g} s); heartbeat {args.heartbeat_interval:g} s x 3; "
           + ("no chaos." if args.no_chaos else
              f"worker kill -9 every {args.worker_kill[0]:g}-{args.worker_kill[1]:g} s "
              f"(restart {args.worker_restart_delay:g} s later), broker kill -9 every "
              f"~{args.broker_kill_every:g} s (restart {args.broker_restart_delay:g} s later)."),
           f"Load ran {soak.load_seconds:.0f} s. Logs: `{soak.workdir}`.", "",
           "| requests | count | |", "|---|---:|---|"]

    def row(name: str, value: Any, note: str = "") -> None:
        out.append(f"| {name} | {value} | {note} |")

    row("sent", f"{s.sent:,}", f"{s.sent / soak.load_seconds:.0f}/s" if soak.load_seconds else "")
    row("answered ok", f"{s.ok:,}",
        f"p50 {percentile(s.latencies, .5) * 1000:.0f} ms, p99 "
        f"{percentile(s.latencies, .99) * 1000:.0f} ms, max "
        f"{max(s.latencies, default=0) * 1000:.0f} ms" if s.latencies else "")
    row("answered with an error", f"{errors:,}", "by text below")
    row("re-attached after a reconnect", f"{s.reattached:,}",
        f"{s.resent} of them sent again (they had not arrived); {s.disconnects} connections "
        f"cut, {s.reconnects} reconnects ({s.moved_home} of them moving back to a restarted "
        "home broker)")
    row("**duplicates** (2nd answer to a request id)", f"**{s.duplicates}**", "must be 0")
    row("**never answered on a live connection**", f"**{s.unanswered}**", "must be 0")
    row("**answer with another request's payload**", f"**{s.wrong_payload}**", "must be 0")
    row("answers on another connection than the request's", s.misrouted, "should be 0")
    row("answers to unknown request ids", s.unknown, "should be 0")
    row("late answers (after timeout + 5 s)", s.late, "")
    accounted = s.ok + errors + s.unanswered + s.wrong_payload
    row("sent - (ok + errors + unanswered + wrong)", s.sent - accounted,
        "0 unless interrupted")
    row("distinct worker ids that answered", len(s.served_by), "a restarted worker gets a new id")
    if s.errors:
        out += ["", "| error text (normalised) | count |", "|---|---:|"]
        out += [f"| `{text}` | {n:,} |" for text, n in s.errors.most_common()]

    out += ["", "| resources, sampled every "
            f"{args.sample_every:g} s | first / max / last | |", "|---|---|---|"]
    for b in soak.brokers:
        values = [r[b.name][1] for r in soak.samples if r.get(b.name)]
        row(f"{b.name} RSS (MB)", first_max_last(values),
            f"{b.starts - 1} restarts: each restart starts from scratch")
    row("Redis keys under the prefix", first_max_last([r["keys"] for r in soak.samples]), "")
    row("Redis bytes under the prefix (MEMORY USAGE)",
        first_max_last([r["bytes"] for r in soak.samples]), "")
    row("workers listed by the cluster", first_max_last([r["listed"] for r in soak.samples]),
        f"{args.workers} running; a killed one is listed until dropped")
    if soak.key_kinds:
        first, last = soak.key_kinds[0], soak.key_kinds[-1]
        out += ["", "| Redis key under the prefix (normalised) | first: keys, elements, bytes "
                "| max elements | last: keys, elements, bytes |", "|---|---:|---:|---:|"]
        for kind in sorted(set(first) | set(last)):
            a, b = first.get(kind, [0, 0, 0]), last.get(kind, [0, 0, 0])
            peak = max(k.get(kind, [0, 0, 0])[2] for k in soak.key_kinds)
            out.append(f"| `{kind}` | {a[0]}, {a[2]}, {a[1]:,} | {peak} "
                       f"| {b[0]}, {b[2]}, {b[1]:,} |")

    out += ["", "| chaos | count |", "|---|---:|"]
    out.append(f"| worker kills (kill -9) | {s.worker_kills} |")
    out.append(f"| broker kills (kill -9) | {s.broker_kills} |")
    out.append(f"| broker restarts that failed | {s.broker_restart_failures} |")

    levels, messages = scan_logs([b.log_path for b in soak.brokers])
    out += ["", "Broker logs: " + (", ".join(f"{k} {v}" for k, v in sorted(levels.items()))
                                   or "no warnings or errors")]
    if messages:
        out += ["", "| broker log line (normalised) | count |", "|---|---:|"]
        out += [f"| `{m}` | {n:,} |" for m, n in messages.most_common(15)]
    wlevels, _ = scan_logs([w.log_path for w in soak.workers])
    out += ["", "Worker logs: " + (", ".join(f"{k} {v}" for k, v in sorted(wlevels.items()))
                                   or "no warnings or errors")]

    for kind, texts in s.examples.items():
        out += ["", f"Examples, {kind}:", ""] + [f"- `{t}`" for t in texts]

    out += ["", "Samples:", "", "| t (s) | " + " | ".join(f"{b.name} pid, RSS MB"
                                                           for b in soak.brokers)
            + " | Redis keys | Redis bytes | workers listed | in flight | load avg (1 min) |",
            "|---:|" + "---|" * len(soak.brokers) + "---:|---:|---:|---:|---:|"]
    for r in soak.samples:
        cells = [f"{r[b.name][0]}, {r[b.name][1]:.0f}" if r.get(b.name) and r[b.name][1]
                 else "down" for b in soak.brokers]
        out.append(f"| {r['t']:.0f} | " + " | ".join(cells)
                   + f" | {r['keys']} | {r['bytes']} | {r['listed']} | {r['in_flight']} "
                   f"| {r['load']:.1f} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


async def main_async(args: argparse.Namespace) -> int:
    soak = Soak(args)
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        await soak.run()
    except asyncio.CancelledError:
        soak.interrupted = True
        soak.load_seconds = soak.load_seconds or soak.t()
        print("\ninterrupted: killing everything, writing a partial report", flush=True)
    except SoakBug as exc:
        import traceback
        traceback.print_exception(exc)
        soak.setup_error = f"the soak itself crashed: {exc.__cause__!r}"
    except (RuntimeError, redis.RedisError, OSError, TimeoutError) as exc:
        soak.setup_error = f"{type(exc).__name__}: {exc}"
        print(f"soak could not run: {soak.setup_error}", file=sys.stderr, flush=True)
    finally:
        soak.teardown()
    text = report(soak)
    print("\n" + text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}; events and logs in {soak.workdir}", flush=True)
    (soak.workdir / "events.log").write_text("\n".join(soak.events) + "\n")
    if soak.interrupted:
        return 130
    if soak.setup_error:
        return 2
    return 1 if soak.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_loopback(args.redis_url, "Redis")
    if args.database_url:
        check_loopback(args.database_url, "Database")
    if args.brokers < 1 or args.workers < 1 or args.concurrency < 1:
        raise SystemExit("--brokers, --workers and --concurrency must be at least 1")
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:  # asyncio.run re-raises Ctrl-C after main_async returned
        return 130


if __name__ == "__main__":
    sys.exit(main())
