"""The worker side installs on its own: a wheel, a fresh venv with no Django, a worker.

A worker machine should not have to copy the ``workers/`` folder out of a checkout:
``pip install`` of this project gives the ``workers`` package and its two commands
with ``websockets`` only, and a worker started from there serves a real broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import ROOT, Broker, wait_for

pytestmark = [pytest.mark.heavy, pytest.mark.integration, pytest.mark.timeout(300)]


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 240) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env={k: v for k, v in os.environ.items()
                                               if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    assert out.returncode == 0, f"{args}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_the_worker_wheel_installs_and_serves_without_django(tmp_path: Path,
                                                              broker: Broker) -> None:
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    source = tmp_path / "source"  # built from a copy: setuptools leaves build/ behind
    shutil.copytree(ROOT / "workers", source / "workers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps",
        "--disable-pip-version-check", "-q", "-w", wheels, source)
    [wheel] = wheels.glob("broker_workers-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q",
        "--disable-pip-version-check", wheel)
    installed = run(python, "-c", "import importlib.metadata as m, sys; "
                                  "print(sorted(d.metadata['Name'].lower() for d in "
                                  "m.distributions()))", cwd=elsewhere)
    assert "django" not in installed and "websockets" in installed, installed
    assert "broker-workers" in installed
    # The README's way: a module of one's own, in the folder the worker runs from.
    (elsewhere / "my_commands.py").write_text(
        "from workers.handlers import command\n\n@command()\n"
        "def greet(name: str) -> str:\n    return f'hi {name}'\n")
    worker = subprocess.Popen([str(venv / "bin" / "broker-worker"), broker.host,
                               str(broker.worker_port), "--name", "from-the-wheel",
                               "--handlers", "my_commands"],
                              cwd=elsewhere, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: [w["name"] for w in broker.workers()] == ["from-the-wheel"], 30,
                 "the installed worker to register")
        answer = run(python, "-m", "workers.requester", broker.host, str(broker.requester_port),
                     "echo", '{"message": "installed"}', cwd=elsewhere)
        assert '"data": "Echo: installed"' in answer
        greeted = run(python, "-m", "workers.requester", broker.host,
                      str(broker.requester_port), "greet", '{"name": "wheel"}', cwd=elsewhere)
        assert '"data": "hi wheel"' in greeted
    finally:
        worker.terminate()
        assert worker.wait(20) == 0
