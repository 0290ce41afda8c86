"""The systems under test: how to start each, where its sockets are, which pids are it.

Every system takes the same bench worker and load generator; ``proto`` tells them
which wire format to speak (for ``celery`` the bench-worker process is a ``celery
worker`` and the load generator calls ``apply_async``). ``start`` raises
:class:`Unavailable` with a reason when a system cannot run here (no NATS server, an
ASGI server not installed, ...): the harness then reports the row as ``n/a (reason)``
and goes on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
from importlib import metadata
from pathlib import Path

from bench.common import (HOST, Proc, find_pids, free_port, http_json, port_open, python,
                          wait_until)

START_TIMEOUT = 40.0
#: The celery worker's pool, ``POOL:CONCURRENCY`` (``--celery-pool``; why this one:
#: bench/README.md).
CELERY_POOL = "threads:64"


class Unavailable(Exception):
    """This system cannot run here; ``str()`` says why."""


class System:
    """One broker (or broker-like service) under test."""

    name = "?"
    description = "?"
    proto = "ws"
    #: "peak": VmHWM of processes we started; "current": RSS of a service that was running.
    rss_mode = "peak"
    #: More arguments for the load generator (``--batch``: requests sent together go in
    #: one frame, as the Python client sends them).
    loadgen_args: list[str] = []
    #: More arguments for the bench worker (celery: its pool and key prefix).
    worker_args: list[str] = []

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = dict(env or {})
        self.procs: list[Proc] = []
        self.worker_url = ""
        self.requester_url = ""
        self.health_url = ""

    # what the harness measures
    def broker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def ext_pids(self) -> list[int]:
        return []

    def start(self) -> None:
        raise NotImplementedError

    def workers_seen(self) -> int | None:
        """Workers the requester side can use, when the system can say."""
        if not self.health_url:
            return None
        return int(http_json(self.health_url).get("workers", 0))

    def check(self, expected_workers: int, timeout: float = 10.0) -> str | None:
        """None when requests can reach all workers; else why not."""
        if not self.health_url:
            return None
        seen = wait_until(lambda: (self.workers_seen() or 0) >= expected_workers, timeout)
        if seen:
            return None
        return (f"the requester side sees {self.workers_seen()} of {expected_workers} "
                f"workers after {timeout:.0f}s")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGTERM)

    def log_tail(self) -> str:
        return "\n".join(p.log_tail(8) for p in self.procs if p.log_tail(8))

    def _spawn(self, tag: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(f"{self.name}-{tag}-{len(self.procs)}", args, {**self.env, **(env or {})},
                    self.workdir, clean=True)
        self.procs.append(proc)
        return proc

    def _serve(self, proc: Proc, worker_url: str, requester_url: str, health_url: str) -> None:
        """Record where ``proc`` listens, then wait until its health URL says ok."""
        self.worker_url, self.requester_url = worker_url, requester_url
        self.health_url = health_url
        self._wait_healthy(health_url, proc)

    def _wait_healthy(self, url: str, proc: Proc) -> None:
        ok = wait_until(lambda: not proc.alive() or http_json(url, 1.0).get("status") == "ok",
                        START_TIMEOUT)
        if not ok or not proc.alive():
            raise Unavailable(f"{self.name} did not come up: {proc.log_tail(5) or 'no output'}")


# ---------------------------------------------------------------------------- baselines


class Baseline(System):
    name = "baseline"
    description = "plain websockets broker (bench/baseline_broker.py), asyncio loop"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 uvloop: bool = False) -> None:
        super().__init__(workdir, env)
        self.uvloop = uvloop
        if uvloop:
            self.name = "baseline-uvloop"
            self.description = "plain websockets broker on uvloop"

    def start(self) -> None:
        wport, rport = free_port(), free_port()
        args = [python(), "bench/baseline_broker.py", "--host", HOST, "--worker-port", str(wport),
                "--requester-port", str(rport)]
        if self.uvloop:
            args.append("--uvloop")
        self._serve(self._spawn("broker", args), f"ws://{HOST}:{wport}",
                    f"ws://{HOST}:{rport}", f"http://{HOST}:{rport}/healthz")


class Nats(System):
    name = "nats"
    description = "NATS request-reply (nats-server on :4222, nats-py clients, queue group)"
    proto = "nats"
    rss_mode = "current"
    port = 4222

    def broker_pids(self) -> list[int]:
        return find_pids("nats-server")

    def start(self) -> None:
        if importlib.util.find_spec("nats") is None:
            raise Unavailable("nats-py is not installed (pip install -r bench/requirements.txt)")
        if not port_open(self.port):
            raise Unavailable(f"no NATS server on {HOST}:{self.port}")
        self.worker_url = self.requester_url = f"nats://{HOST}:{self.port}"


class SocketIO(System):
    name = "socketio"
    description = "python-socketio server call() to a worker client, on uvicorn+uvloop"
    proto = "sio"

    def start(self) -> None:
        for module in ("socketio", "uvicorn"):
            if importlib.util.find_spec(module) is None:
                raise Unavailable(f"{module} is not installed (pip install -r "
                                  "bench/requirements.txt)")
        port = free_port()
        proc = self._spawn("server", [python(), "bench/socketio_server.py", "--port", str(port)])
        self.worker_url = self.requester_url = f"ws://{HOST}:{port}"
        if not wait_until(lambda: not proc.alive() or port_open(port), START_TIMEOUT) \
                or not proc.alive():
            raise Unavailable(f"socket.io server did not come up: {proc.log_tail(5)}")


# ---------------------------------------------------------------------------- ours


class Ours(System):
    """Our broker: ``brokersite.asgi:application``."""

    template_db: Path | None = None  # migrated once per harness run, copied per scenario

    def _db_env(self, tag: str = "") -> dict[str, str]:
        db = self.workdir / f"{self.name}{tag}-{free_port()}.sqlite3"
        if Ours.template_db is not None and Ours.template_db.exists():
            shutil.copyfile(Ours.template_db, db)
        return {"DATABASE_URL": f"sqlite:///{db}"}

    @staticmethod
    def migrate_template(workdir: Path) -> str | None:
        """Create the migrated template database; returns an error text or None."""
        db = workdir / "template.sqlite3"
        proc = Proc("migrate", [python(), "manage.py", "migrate", "-v0"],
                    {"DATABASE_URL": f"sqlite:///{db}"}, workdir, clean=True)
        code = proc.proc.wait(120)
        proc.stop()
        if code != 0:
            return f"manage.py migrate failed: {proc.log_tail(5)}"
        Ours.template_db = db
        return None


class OursDaphne(Ours):
    name = "daphne"
    description = "our broker, embedded default: runbroker (daphne), in-memory layer, SQLite"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, name: str = "daphne",
                 description: str | None = None) -> None:
        super().__init__(workdir, env)
        self.name = name
        if description:
            self.description = description

    def start(self) -> None:
        self.start_on(free_port(), free_port(), free_port())

    def start_on(self, wport: int, rport: int, hport: int, db_env: dict[str, str] | None = None
                 ) -> Proc:
        self.ports = (wport, rport, hport)
        self.db_env = db_env or self._db_env()
        proc = self._spawn("broker", [python(), "manage.py", "runbroker", "--host", HOST,
                                      "--worker-port", str(wport), "--requester-port", str(rport),
                                      "--http-port", str(hport), "--no-migrate"], self.db_env)
        self._serve(proc, f"ws://{HOST}:{wport}", f"ws://{HOST}:{rport}",
                    f"http://{HOST}:{hport}/healthz")
        return proc


class OursAsgi(Ours):
    """Our application on a single port, under another ASGI server."""

    def __init__(self, workdir: Path, server: str, ws: str = "websockets",
                 env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, env)
        self.server = server
        self.ws = ws
        if server == "uvicorn":
            self.name = "uvicorn" if ws == "websockets" else f"uvicorn-{ws}"
            self.description = f"our broker on uvicorn --loop uvloop --ws {ws}"
        else:
            self.name = "granian"
            self.description = "our broker on granian --interface asgi --loop uvloop"

    def start(self) -> None:
        if importlib.util.find_spec(self.server) is None:
            raise Unavailable(f"{self.server} is not installed (pip install -r "
                              "bench/requirements.txt)")
        if importlib.util.find_spec("uvloop") is None:
            raise Unavailable("uvloop is not installed")
        port = free_port()
        exe = shutil.which(self.server, path=os.path.dirname(python())) or self.server
        if self.server == "uvicorn":
            args = [exe, "brokersite.asgi:application", "--host", HOST, "--port", str(port),
                    "--loop", "uvloop", "--ws", self.ws, "--log-level", "warning",
                    "--no-access-log", "--ws-max-size", str(4 * 1048576 + 65536)]
        else:
            args = [exe, "--interface", "asgi", "--host", HOST, "--port", str(port),
                    "--loop", "uvloop", "--workers", "1", "--log-level", "warning",
                    "--no-access-log", "brokersite.asgi:application"]
        proc = self._spawn("broker", args, {**self._db_env(),
                                            "PYTHONWARNINGS": "ignore::DeprecationWarning"})
        self._serve(proc, f"ws://{HOST}:{port}/ws/worker/", f"ws://{HOST}:{port}/ws/requester/",
                    f"http://{HOST}:{port}/healthz")


class OursRedis2P(Ours):
    """Two runbroker processes over Redis: requesters on A, workers on B."""

    name = "redis-2proc"
    description = ("our broker, 2 runbroker processes over Redis: requesters on one, workers "
                   "on the other (every request crosses processes)")

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 redis_db: int = 15, spread: bool = False) -> None:
        super().__init__(workdir, env)
        self.redis_db = redis_db
        #: Requesters and workers on both processes (connections alternate), as a cluster
        #: behind a load balancer: some requests stay in their process, some cross.
        self.spread = spread
        if spread:
            self.name = "redis-2proc-spread"
            self.description = ("our broker, 2 runbroker processes over Redis, requesters and "
                                "workers spread over both")
        self.prefix = f"bench{os.getpid()}x{free_port()}"

    def ext_pids(self) -> list[int]:
        return find_pids("redis-server", ":6379")

    def start(self) -> None:
        if not port_open(6379):
            raise Unavailable(f"no Redis server on {HOST}:6379")
        url = f"redis://{HOST}:6379/{self.redis_db}"
        self.env.update({"REDIS_URL": url, "BROKER_REDIS_PREFIX": self.prefix})
        self.a = OursDaphne(self.workdir, self.env, name="redis-A")
        self.b = OursDaphne(self.workdir, self.env, name="redis-B")
        try:
            self.a.start()
            self.b.start()
        finally:
            self.procs = self.a.procs + self.b.procs
        both = self.spread
        self.requester_url = self.a.requester_url + (f",{self.b.requester_url}" if both else "")
        self.worker_url = (f"{self.a.worker_url}," if both else "") + self.b.worker_url
        self.health_url = self.a.health_url  # the requester side must see B's workers

    def stop(self) -> None:
        super().stop()
        delete_prefixed(self.redis_db, self.prefix)


def delete_prefixed(db: int, prefix: str) -> None:
    """Remove the keys starting with ``prefix`` from Redis database ``db`` (a bounded
    scan; nothing else is touched, nothing flushed). Best effort."""
    try:
        import redis

        client = redis.Redis.from_url(f"redis://{HOST}:6379/{db}")
        keys = []
        for i, key in enumerate(client.scan_iter(match=f"{prefix}*", count=1000)):
            keys.append(key)
            if i > 200_000:
                break
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
        client.close()
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass


# ---------------------------------------------------------------------------- celery


class CeleryRedis(System):
    """Celery 5 over the local Redis: what a Django user would otherwise pick.

    Redis is Celery's broker, so its CPU is the redis column (``ext_pids``) and the
    broker column stays empty; the ``celery worker`` process (with its pool: threads,
    or prefork children) is the harness's bench-worker process, so it is the workers
    column; the callers (``apply_async`` + ``get``) are the load generator's.
    """

    name = "celery"
    proto = "celery"

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, redis_db: int = 14,
                 pool: str = CELERY_POOL) -> None:
        super().__init__(workdir, env)
        self.redis_db = redis_db
        self.pool = pool
        self.prefix = f"celerybench{os.getpid()}x{free_port()}:"
        self.worker_args = ["--celery-pool", pool, "--celery-prefix", self.prefix]
        self.loadgen_args = ["--celery-prefix", self.prefix]
        kind, _, size = pool.partition(":")
        self.description = (f"Celery {_version('celery')} over Redis (db {redis_db}): "
                            "apply_async() + AsyncResult.get() from a thread per request in "
                            "flight, task_acks_late, Redis result backend (get() waits on "
                            f"pub/sub); one celery worker process, -P {kind} -c {size or 1}; "
                            "broker CPU: none of its own, Redis is the redis column")

    def broker_pids(self) -> list[int]:
        return []  # no broker process of Celery's own: Redis is it (the ext column)

    def ext_pids(self) -> list[int]:
        return find_pids("redis-server", ":6379")

    def start(self) -> None:
        for module, package in (("celery", "celery"), ("redis", "redis")):
            if importlib.util.find_spec(module) is None:
                raise Unavailable(f"{package} is not installed (pip install -r "
                                  "bench/requirements.txt)")
        if not port_open(6379):
            raise Unavailable(f"no Redis server on {HOST}:6379")
        self.worker_url = self.requester_url = f"redis://{HOST}:6379/{self.redis_db}"
        try:  # e.g. a database number the server does not have: say so now, not in 30 s
            import redis

            client = redis.Redis.from_url(self.worker_url, socket_timeout=5)
            client.ping()
            client.close()
        except Exception as exc:  # noqa: BLE001 - any failure is the reason
            raise Unavailable(f"Redis database {self.redis_db}: {exc}") from exc

    def stop(self) -> None:
        super().stop()
        delete_prefixed(self.redis_db, self.prefix)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def make_system(name: str, workdir: Path, redis_db: int = 15, celery_redis_db: int = 14,
                celery_pool: str = CELERY_POOL) -> System:
    if name == "baseline":
        return Baseline(workdir)
    if name == "baseline-uvloop":
        return Baseline(workdir, uvloop=True)
    if name == "daphne":
        return OursDaphne(workdir)
    if name == "daphne-nohist":
        return OursDaphne(workdir, {"BROKER_HISTORY": "0"}, name="daphne-nohist",
                          description="embedded default with BROKER_HISTORY=0")
    if name == "daphne-nostore":
        return OursDaphne(workdir, {"BROKER_JOB_STORE": "0"}, name="daphne-nostore",
                          description="embedded default with BROKER_JOB_STORE=0")
    if name.endswith("-batch") and name != "-batch":  # requesters that send batch frames
        system = make_system(name.removesuffix("-batch"), workdir, redis_db)
        system.name, system.loadgen_args = name, ["--batch"]
        system.description += ("; requests and answers in batch frames (as the Python client "
                               "sends them)")
        return system
    if name == "daphne-nodb":
        return OursDaphne(workdir, {"BROKER_JOB_STORE": "0", "BROKER_HISTORY": "0"},
                          name="daphne-nodb", description="embedded default with "
                          "BROKER_JOB_STORE=0 and BROKER_HISTORY=0 (no database writes)")
    if name == "uvicorn":
        return OursAsgi(workdir, "uvicorn")
    if name == "uvicorn-sansio":
        return OursAsgi(workdir, "uvicorn", ws="websockets-sansio")
    if name == "granian":
        return OursAsgi(workdir, "granian")
    if name == "redis-2proc":
        return OursRedis2P(workdir, redis_db=redis_db)
    if name == "redis-2proc-spread":
        return OursRedis2P(workdir, redis_db=redis_db, spread=True)
    if name == "nats":
        return Nats(workdir)
    if name == "socketio":
        return SocketIO(workdir)
    if name == "celery":
        return CeleryRedis(workdir, redis_db=celery_redis_db, pool=celery_pool)
    raise KeyError(name)


SYSTEM_NAMES = ["baseline", "baseline-uvloop", "daphne", "daphne-nohist", "daphne-nostore",
                "daphne-nodb", "daphne-batch", "uvicorn", "uvicorn-batch",
                "uvicorn-sansio", "granian", "redis-2proc", "redis-2proc-spread", "nats",
                "socketio", "celery"]
