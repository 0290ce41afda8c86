"""A second host for tests: a network namespace joined to this one by a veth pair.

What a peer that is not on loopback sees (protected mode, proxies) can only be
tested from an address that is not loopback. ``remote_host`` makes one: the
broker listens on ``host_ip``, and ``run(...)`` runs a command from ``peer_ip``,
inside the namespace. Needs root and iproute2; without them the test is skipped
with the reason (``REQUIRE_SERVICES=1``, as in CI, turns that into a failure).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.procs import ROOT


@dataclass
class RemoteHost:
    name: str
    host_ip: str  # this side of the veth pair: where the broker listens
    peer_ip: str  # the namespace's side: where the "remote" peer comes from

    def run(self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command from the remote host, with this checkout on its PYTHONPATH."""
        return subprocess.run(["ip", "netns", "exec", self.name, *args], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-c", code, timeout=timeout)


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"NETWORK NAMESPACES REQUIRED (REQUIRE_SERVICES=1) but {reason}",
                    pytrace=False)
    pytest.skip(f"NO NETWORK NAMESPACES: {reason}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def remote_host() -> Iterator[RemoteHost]:
    if shutil.which("ip") is None:
        _unavailable("the 'ip' command (iproute2) is missing")
    if os.geteuid() != 0:
        _unavailable("creating one needs root")
    tag = f"{os.getpid() % 10000}{random.randrange(100):02d}"
    name, host_if, peer_if = f"brk{tag}", f"vbh{tag}", f"vbp{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    remote = RemoteHost(name, f"{subnet}.1", f"{subnet}.2")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", name)
        _ip("addr", "add", f"{remote.host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{remote.peer_ip}/30", "dev", peer_if)
        _ip("-n", name, "link", "set", peer_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        _unavailable(f"ip {' '.join(exc.cmd[1:])} failed: {exc.stderr.strip()}")
    try:
        yield remote
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
