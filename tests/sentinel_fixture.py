"""Redis with Sentinel for tests: a master, a replica and three sentinels, all private.

``sentinel_cluster`` starts them on free 127.0.0.1 ports in a temporary directory
(sentinels rewrite their own config files), waits until the replica is in sync and
every sentinel sees the other two and the replica, and stops everything afterwards.
``kill_master()`` is ``kill -9`` of the master; ``wait_failover()`` waits until all
three sentinels name the replica. No ``redis-server`` binary: the test is skipped
with the reason (a failure under ``REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.procs import free_port

MASTER_NAME = "brokermaster"
#: How long a silent master takes to be declared down; failover follows ~1.3 s later.
DOWN_AFTER_MS = 1000


class SentinelCluster:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a broker needs to find the master through the sentinels."""
        return {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports),
                "REDIS_SENTINEL_MASTER": MASTER_NAME}

    def _start(self, name: str, lines: list[str], *extra: str) -> None:
        config = self.directory / f"{name}.conf"
        config.write_text("\n".join(lines) + "\n")
        with (self.directory / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen([self.binary, str(config), *extra],
                                                stdout=log, stderr=subprocess.STDOUT,
                                                cwd=self.directory)

    def _server(self, port: int) -> list[str]:
        return [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no",
                f"dir {self.directory}", f"dbfilename dump-{port}.rdb"]

    def start(self, timeout: float = 30.0) -> SentinelCluster:
        self._start("master", self._server(self.master_port))
        self._start("replica", [*self._server(self.replica_port),
                                f"replicaof 127.0.0.1 {self.master_port}"])
        for i, port in enumerate(self.sentinel_ports):
            self._start(f"sentinel{i}", [
                f"port {port}", "bind 127.0.0.1", f"dir {self.directory}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} 5000",
                f"sentinel parallel-syncs {MASTER_NAME} 1"], "--sentinel")
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sentinel cluster not ready in {timeout}s; logs in "
                                   f"{self.directory}")
            time.sleep(0.05)
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1,
                           socket_connect_timeout=1, decode_responses=True,
                           retry=Retry(NoBackoff(), 0))

    def _ready(self) -> bool:
        try:
            if self.client(self.replica_port).info("replication").get(
                    "master_link_status") != "up":
                return False
            states = [self.client(p).sentinel_master(MASTER_NAME) for p in self.sentinel_ports]
        except redis.RedisError:
            return False
        return all(int(s["num-other-sentinels"]) == 2 and int(s["num-slaves"]) == 1
                   for s in states)

    def master_seen_by_all(self) -> int | None:
        """The master's port, if all three sentinels agree on it."""
        ports = set()
        for port in self.sentinel_ports:
            try:
                ports.add(int(self.client(port).sentinel_get_master_addr_by_name(
                    MASTER_NAME)[1]))
            except (redis.RedisError, TypeError):
                return None
        return ports.pop() if len(ports) == 1 else None

    def kill_master(self) -> None:
        self.procs["master"].send_signal(signal.SIGKILL)
        self.procs["master"].wait(10)

    def wait_failover(self, timeout: float = 30.0) -> float:
        """Seconds until every sentinel names the replica as the master."""
        started = time.monotonic()
        while self.master_seen_by_all() != self.replica_port:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no failover within {timeout}s")
            time.sleep(0.02)
        return time.monotonic() - started

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def sentinel_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail("REDIS REQUIRED (REQUIRE_SERVICES=1) but no redis-server binary",
                        pytrace=False)
        pytest.skip("NO REDIS: no redis-server binary to start a Sentinel cluster with")
    cluster = SentinelCluster(binary, tmp_path_factory.mktemp("sentinel")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
