"""The benchmark harness still runs: baseline and our broker, one worker, a second each.

Needs only the broker's own requirements (psutil, matplotlib, uvloop and the other
bench extras are optional to the harness), so it runs in CI and keeps ``bench/``
from rotting. The figures themselves are not checked, only that they exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.heavy, pytest.mark.integration, pytest.mark.timeout(90)]


def test_harness_measures_baseline_and_our_broker(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--systems", "baseline,daphne", "--points", "8:1:100",
         "--warmup", "0.2", "--duration", "0.8", "--no-plot", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    data = json.loads((tmp_path / "latest.json").read_text())
    rows = {row["scenario"]["system"]: row for row in data["rows"]}
    assert set(rows) == {"baseline", "daphne"}
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['reason']}"
        assert row["rps"] > 0 and row["ok"] > 0, row
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], row
    assert rows["baseline"]["ratio_rps"] == pytest.approx(1.0)

    table = (tmp_path / "latest.md").read_text()
    assert "| baseline | 8 | 1 | 100 B |" in table
    assert "| daphne | 8 | 1 | 100 B |" in table
    assert "## Targets" in table
