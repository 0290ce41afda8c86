"""A 20 s run of the soak (``python -m bench.soak``): heavy, ``./test.sh --heavy`` runs it.

Two brokers over Redis, six workers, load, a worker killed every 2-4 s and a broker
killed about every 8 s: every request on a live connection must get exactly one
answer, its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT

pytestmark = [pytest.mark.heavy, pytest.mark.integration, pytest.mark.timeout(240)]


def test_soak_20s(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "soak.md"
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("DATABASE_URL", None)  # SQLite in the soak's own scratch directory
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "20", "--worker-kill", "2", "4",
         "--broker-kill-every", "8", "--sample-every", "5", "--workdir", str(tmp_path / "run"),
         "--out", str(out), "--seed", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    report = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "# Soak: PASS" in report
    assert "| **duplicates** (2nd answer to a request id) | **0** |" in report
    assert "| **never answered on a live connection** | **0** |" in report
    assert "| broker kills (kill -9) | 0 |" not in report
