"""The README stays true: its commands exist, its example runs, its tables are complete."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from dispatch import conf
from tests.procs import ROOT, Broker

README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[str]:
    lines = [line.split("#")[0].strip() for block in code_blocks("bash") for line in
             block.splitlines()]
    return sorted({line for line in lines if line.startswith(("python", "./"))})


@pytest.mark.parametrize("command", shell_commands())
def test_every_shell_command_in_the_readme_exists(command: str) -> None:
    """Each command, with its arguments as written, answers --help (so it exists)."""
    words = shlex.split(command)
    if words[0] == "./test.sh":
        pytest.skip("this is the command running these tests")
    argv = [sys.executable, *words[1:], "--help"] if words[0] == "python" else [*words, "--help"]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    for flag in re.findall(r"(--[a-z-]+)", command):
        assert flag in result.stdout, f"{flag} is not a flag of {' '.join(words[:3])}"


def test_management_commands_in_the_table_exist() -> None:
    for name in re.findall(r"\| `python manage.py (\w+)", README):
        result = subprocess.run([sys.executable, "manage.py", name, "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (name, result.stderr)


def test_configuration_table_lists_every_setting() -> None:
    for name in conf.DEFAULTS:
        assert f"`BROKER_{name}`" in README, f"BROKER_{name} missing from the README"


def test_python_example_runs(broker: Broker, spawn_worker) -> None:
    spawn_worker("readme")
    [example] = [b for b in code_blocks("python") if "SyncRequester" in b]
    code = example.replace("ws://localhost:8766", broker.requester_url)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Echo: hi", str([i * 2 for i in range(10)]), "False Division by zero"]
