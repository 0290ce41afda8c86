"""Redis for tests, as a pytest plugin (``pytest_plugins = ["tests.redis_fixture"]``).

- ``redis_url`` (session): ``$REDIS_URL`` if it answers; else a private ``redis-server``
  started for the session; else the test is skipped, saying why (with
  ``REQUIRE_SERVICES=1``, as in CI, it fails instead: a missing service must not turn
  into a green run that tested nothing).
- ``redis_prefix``: a key prefix of its own for one test; its keys are deleted after.
  The shared server may be somebody else's: we never flush it.
- ``redis_server``: a private server for one test, which the test may ``stop()`` and
  ``start()`` again on the same port (outage tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, NoReturn

import pytest
import redis


def _missing(reason: str) -> NoReturn:
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"REDIS REQUIRED (REQUIRE_SERVICES=1) but {reason}", pytrace=False)
    pytest.skip(f"NO REDIS: {reason}; set REDIS_URL or install redis-server")


def _ping_error(url: str) -> str | None:
    """None if Redis at ``url`` answers a PING, else why not."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        return str(exc)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1, without persistence, that can be restarted.

    It keeps its port across restarts, so clients holding ``url`` reconnect to it.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        log_path = self.directory / "redis-server.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while (error := _ping_error(self.url)) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port} ({error}):\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _private_server(directory: Path, why_needed: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        _missing(f"no redis-server binary on PATH ({why_needed})")
    return RedisServer(binary, directory).start()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis every test may use, under a prefix of its own (``redis_prefix``)."""
    url = os.environ.get("REDIS_URL")
    reason = "REDIS_URL is not set"
    if url:
        error = _ping_error(url)
        if error is None:
            yield url
            return
        reason = f"REDIS_URL={url} does not answer ({error})"
    server = _private_server(tmp_path_factory.mktemp("redis"), reason)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix for one test; every ``<prefix>:*`` key is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    try:
        with redis.Redis.from_url(redis_url, socket_connect_timeout=2,
                                  socket_timeout=5) as client:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    except redis.RedisError:
        pass  # the keys carry TTLs; nothing leaks for good


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis for one test, which it may stop and start (``.url``, ``.stop()``,
    ``.start()``); stopped at the end."""
    server = _private_server(tmp_path_factory.mktemp("redis-server"),
                             "a private server is needed to stop and restart Redis")
    try:
        yield server
    finally:
        server.stop()
