"""The README and the docs stay true: their commands exist, their examples run, their
tables are complete, their links lead somewhere."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from dispatch import conf
from tests.procs import ROOT, Broker, manage_many, scaled

README = (ROOT / "README.md").read_text(encoding="utf-8")
#: The README and every page of docs/, by path.
PAGES = {path: path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
DOCS = "\n".join(PAGES.values())


def code_blocks(lang: str, text: str = DOCS) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def shell_commands() -> list[str]:
    lines = [line.split("#")[0].strip() for block in code_blocks("bash") for line in
             block.splitlines()]
    return sorted({line for line in lines if line.startswith(("python", "./"))})


def table_commands() -> list[str]:
    return re.findall(r"\| `python manage.py (\w+)", DOCS)


def help_argv(command: str) -> list[str]:
    words = shlex.split(command)
    return [sys.executable, *words[1:], "--help"] if words[0] == "python" else [*words, "--help"]


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """The ``--help`` of every command the README shows: ``manage.py`` ones all in one
    process (one Django start, not thirty), the others each in its own."""
    wanted = {tuple(help_argv(c)) for c in shell_commands() if not c.startswith("./test.sh")}
    wanted |= {(sys.executable, "manage.py", name, "--help") for name in table_commands()}
    django = sorted(argv for argv in wanted if argv[1:2] == ("manage.py",))
    others = sorted(wanted - set(django))
    with ThreadPoolExecutor(4) as pool:  # processes that mostly start up: side by side
        in_one = pool.submit(manage_many, [list(argv[2:]) for argv in django])
        each = [pool.submit(subprocess.run, argv, cwd=ROOT, capture_output=True, text=True,
                            timeout=scaled(120)) for argv in others]
        return {**dict(zip(django, in_one.result())),
                **{argv: done.result() for argv, done in zip(others, each)}}


@pytest.mark.parametrize("command", shell_commands())
def test_every_shell_command_in_the_readme_exists(command: str, helps) -> None:
    """Each command, with its arguments as written, answers --help (so it exists)."""
    words = shlex.split(command)
    if words[0] == "./test.sh":
        pytest.skip("this is the command running these tests")
    result = helps[tuple(help_argv(command))]
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    for flag in re.findall(r"(--[a-z-]+)", command):
        assert flag in result.stdout, f"{flag} is not a flag of {' '.join(words[:3])}"


def test_management_commands_in_the_table_exist(helps) -> None:
    names = table_commands()
    assert names
    for name in names:
        result = helps[(sys.executable, "manage.py", name, "--help")]
        assert result.returncode == 0, (name, result.stderr)


def test_configuration_table_lists_every_setting() -> None:
    table = PAGES[ROOT / "docs" / "configuration.md"]
    for name in conf.NAMES:
        assert f"`BROKER_{name}`" in table, f"BROKER_{name} missing from docs/configuration.md"


def test_the_readme_is_short_and_every_link_between_pages_leads_somewhere() -> None:
    """The README says what this is and how to start, in under 300 lines; the rest is
    in docs/, and a link to a page (or a heading of one) finds it."""
    assert len(README.splitlines()) < 300
    for path, text in PAGES.items():
        for target in re.findall(r"\]\(([^)#]*)(?:#[^)]*)?\)", text):
            if target and not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), f"{path.name} links to {target}"
        for page, anchor in re.findall(r"\]\(([^)#]*)#([^)]+)\)", text):
            heading_text = PAGES.get((path.parent / page).resolve() if page else path, "")
            anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                       for h in re.findall(r"^#+ (.+)$", heading_text, flags=re.M)}
            assert anchor in anchors, f"{path.name} links to {page}#{anchor}: no such heading"


def test_python_example_runs(shared_broker: Broker, spawn_worker) -> None:
    spawn_worker("readme")
    [example] = [b for b in code_blocks("python", README) if "SyncRequester" in b]
    code = example.replace("ws://localhost:8766", shared_broker.requester_url)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Echo: hi", str([i * 2 for i in range(10)]), "False Division by zero"]


def test_the_uvicorn_command_serves_workers_and_requesters(tmp_path) -> None:
    """The README's uvicorn line, as written (but on a free loopback port), serves both
    sockets on one port: a worker registers and a request is answered."""
    from tests.procs import migrated_template, wait_for
    from workers.requester import SyncRequester

    [line] = [b.split("#")[0].strip() for block in code_blocks("bash")
              for b in block.splitlines() if b.startswith("uvicorn ")]
    words = shlex.split(line)
    words[words.index("--host") + 1], words[words.index("--port") + 1] = "127.0.0.1", "0"
    shutil.copyfile(migrated_template(), tmp_path / "db.sqlite3")
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
           "BROKER_HISTORY_FLUSH_SECONDS": "0.2"}
    log_path = tmp_path / "uvicorn.log"
    log = log_path.open("wb")
    server = subprocess.Popen([sys.executable, "-m", *words], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    worker: subprocess.Popen | None = None
    try:
        def listening() -> int | None:
            text = log_path.read_text(errors="replace")
            if server.poll() is not None:
                pytest.fail(f"uvicorn exited with {server.returncode}:\n{text}")
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
            return int(found[1]) if found else None

        port = wait_for(listening, 30, "uvicorn to listen on the port it chose")
        worker = subprocess.Popen([sys.executable, "-m", "workers",
                                   f"ws://127.0.0.1:{port}/ws/worker/", "--name", "uv"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

        def registered() -> bool:
            if server.poll() is not None:
                pytest.fail(log_path.read_text(errors="replace"))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return json.load(r)["workers"] == 1

        wait_for(registered, 30, "uvicorn up with one worker")
        with SyncRequester(f"ws://127.0.0.1:{port}/ws/requester/?token=secret-in-the-url"
                           ) as broker:
            assert broker.call("echo", message="hi") == "Echo: hi"
        text = (tmp_path / "uvicorn.log").read_text(errors="replace")
        assert "/ws/requester/?token=[redacted]" in text  # uvicorn logs the path...
        assert "secret-in-the-url" not in text  # ...but not the token
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def run_snippet(code: str, broker: Broker, cwd=ROOT) -> list[str]:
    code = code.replace("ws://localhost:8766", broker.requester_url)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                            text=True, timeout=scaled(60),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_error_codes_example_runs(shared_broker: Broker, spawn_worker) -> None:
    spawn_worker("codes")
    [example] = [b for b in code_blocks("python", PAGES[ROOT / "docs" / "protocol.md"])
                 if "NoWorkers" in b]
    assert run_snippet(example, shared_broker) == [
        "no_workers - No available workers", "command_error - Division by zero"]


def test_the_long_jobs_examples_run(shared_broker: Broker, spawn_worker, tmp_path) -> None:
    """The worker's jobs.py and the requester's long_jobs.py, as the page shows them."""
    worker_code, requester_code = code_blocks("python", PAGES[ROOT / "docs" / "long-jobs.md"])
    (tmp_path / "jobs.py").write_text(worker_code)
    spawn_worker("long-jobs", "--handlers", "jobs",
                 env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    assert run_snippet(requester_code, shared_broker) == [
        "20% epoch 1", "40% epoch 2", "60% epoch 3", "80% epoch 4", "100% epoch 5",
        "trained: {'epochs': 5}", "done ['read', 'convert', 'write']", "pages: cancelled"]


def test_the_readmes_command_module_runs(broker: Broker, spawn_worker, tmp_path) -> None:
    """README's my_commands.py, as printed, served by a worker with --handlers (on a
    broker of its own: its 'resize' must not meet test_describe's on the shared one)."""
    from workers.requester import SyncRequester

    [module] = [b for b in code_blocks("python", README) if "# my_commands.py" in b]
    (tmp_path / "my_commands.py").write_text(module)
    spawn_worker("readme-commands", "--handlers", "my_commands",
                 env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    with SyncRequester(broker.requester_url) as requester:
        assert requester.call("sum", numbers=[1, 2, 3.5]) == 6.5
        assert requester.call("resize", url="https://example.com/a.png") == {
            "url": "https://example.com/a.png", "width": 256}
        failed = requester.request("sum", {"numbers": []})
        assert (failed.code, failed.error) == ("command_error", "numbers must not be empty")
