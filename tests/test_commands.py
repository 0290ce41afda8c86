"""Control commands against a stub broker that speaks the HTTP control API contract."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from typing import Any, Iterator

import pytest
from django.core.management import CommandError, call_command

from dispatch.control.client import BrokerClient, BrokerError, BrokerUnreachable

ROOT = Path(__file__).resolve().parent.parent

WORKERS = [
    {"worker_id": "w1", "name": "alpha", "address": "10.0.0.1:4000", "process": "broker-a",
     "commands": ["echo", "get_time"], "weight": 1.0, "max_concurrency": 8, "in_flight": 3,
     "completed": 120, "errors": 2, "latency_ms": 4.25, "last_heartbeat": 1.0,
     "connected_at": 0.0, "draining": False},
    {"worker_id": "w2", "name": "beta", "address": "10.0.0.2:4000", "process": "broker-b",
     "commands": ["calculate"], "weight": 2.0, "max_concurrency": 16, "in_flight": 0,
     "completed": 0, "errors": 0, "latency_ms": None, "last_heartbeat": 1.0,
     "connected_at": 0.0, "draining": True},
]


# --------------------------------------------------------------------------- stub broker


@dataclass
class StubState:
    """What the stub serves and what it was sent."""

    workers: list[dict[str, Any]] = field(default_factory=lambda: list(WORKERS))
    token: str = ""
    delay: float = 0.0
    received: list[tuple[str, str, Any, str | None]] = field(default_factory=list)

    def last(self) -> Any:
        return self.received[-1][2]


class StubHandler(BaseHTTPRequestHandler):
    """The contract of dispatch/views.py, with canned answers."""

    state: StubState

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        auth = self.headers.get("Authorization")
        self.state.received.append((method, self.path, body, auth))
        time.sleep(self.state.delay)
        if self.state.token and auth != f"Bearer {self.state.token}":
            return self._reply(401, {"error": "Missing or invalid API token"})
        route = getattr(self, f"{method.lower()}_{self.path.strip('/').replace('/', '_')}", None)
        if route is None:
            return self._reply(404, {"error": f"No such endpoint: {self.path}"})
        status, payload = route(body)
        self._reply(status, payload)

    def _reply(self, status: int, payload: Any) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def get_healthz(self, body: Any) -> tuple[int, Any]:
        return 200, {"status": "ok", "workers": len(self.state.workers),
                     "process": "broker-a", "pending": 0}

    def get_api_workers(self, body: Any) -> tuple[int, Any]:
        return 200, {"workers": self.state.workers}

    def post_api_broadcast(self, body: Any) -> tuple[int, Any]:
        if "message" not in body:
            return 400, {"error": "Field 'message' is required"}
        return 200, {"sent_to": len(self.state.workers)}

    def post_api_send(self, body: Any) -> tuple[int, Any]:
        if body["action"] == "explode":
            return 500, {"error": "Internal error: kaboom"}
        known = any(w["worker_id"] == body["worker_id"] for w in self.state.workers)
        if not known:
            return 200, _response(False, None, f"Unknown worker '{body['worker_id']}'", None)
        if body["action"] == "calculate":
            p = body["params"]
            return 200, _response(True, p["a"] + p["b"], None, body["worker_id"])
        return 200, _response(False, None, f"Unknown action '{body['action']}'",
                              body["worker_id"])

    def post_api_call(self, body: Any) -> tuple[int, Any]:
        if body["command"] == "echo":
            return 200, _response(True, f"Echo: {body['data'].get('message')}", None, "w1")
        return 200, _response(False, None, "No available workers", None)


def _response(success: bool, data: Any, error: str | None, by: str | None) -> dict[str, Any]:
    return {"request_id": "r-1", "success": success, "data": data, "error": error,
            "processed_by": by}


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (the timeout test) is expected, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def stub() -> Iterator[tuple[str, StubState]]:
    state = StubState()
    handler = type("Handler", (StubHandler,), {"state": state})
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_URL", raising=False)
    monkeypatch.delenv("BROKER_API_TOKEN", raising=False)


def run(*args: Any, **options: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- workers


def test_workers_table(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    out, _ = run("workers", broker=url)
    header, alpha, beta = out.strip().splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "PROCESS", "LOAD", "WEIGHT", "DONE",
                              "ERRORS", "LATENCY", "COMMANDS"]
    assert alpha.split() == ["w1", "alpha", "online", "broker-a", "3/8", "1", "120", "2",
                             "4.2", "ms", "echo,get_time"]
    assert " draining " in beta and "0/16" in beta and " - " in beta
    assert header.index("LOAD") == alpha.index("3/8")  # columns line up


def test_workers_json(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    out, _ = run("workers", "--json", broker=url)
    assert json.loads(out) == WORKERS


def test_workers_none_online(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.workers = []
    assert run("workers", broker=url)[0].strip() == "No workers online."


# --------------------------------------------------------------------------- broadcast


def test_broadcast_plain_text(stub: tuple[str, StubState]) -> None:
    url, state = stub
    out, _ = run("broadcast", "hello", "everyone", broker=url)
    assert out.strip() == "Sent to 2 workers."
    assert state.received[-1][:3] == ("POST", "/api/broadcast", {"message": "hello everyone"})


def test_broadcast_json(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.workers = state.workers[:1]
    out, _ = run("broadcast", '{"kind": "reload", "now": true}', broker=url)
    assert out.strip() == "Sent to 1 worker."
    assert state.last() == {"message": {"kind": "reload", "now": True}}


# --------------------------------------------------------------------------- send / call


def test_send_prints_the_response(stub: tuple[str, StubState]) -> None:
    url, state = stub
    out, _ = run("send", "w1", "calculate", '{"a": 10, "b": 20, "op": "+"}',
                 "--timeout", "5", broker=url)
    assert json.loads(out)["data"] == 30
    assert state.last() == {"worker_id": "w1", "action": "calculate",
                            "params": {"a": 10, "b": 20, "op": "+"}, "timeout": 5.0}


def test_send_without_params_sends_an_empty_object(stub: tuple[str, StubState]) -> None:
    url, state = stub
    with pytest.raises(CommandError, match="get_time failed: Unknown action"):
        run("send", "w1", "get_time", broker=url)
    assert state.last() == {"worker_id": "w1", "action": "get_time", "params": {}}


def test_send_failure_prints_and_exits_nonzero(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    out = StringIO()
    with pytest.raises(CommandError, match="Unknown worker 'nobody'"):
        call_command("send", "nobody", "get_time", broker=url, stdout=out)
    assert json.loads(out.getvalue())["success"] is False


@pytest.mark.parametrize("params, message", [
    ("{not json", "PARAMS is not valid JSON"),
    ("[1, 2]", "PARAMS must be a JSON object"),
])
def test_send_bad_params(stub: tuple[str, StubState], params: str, message: str) -> None:
    url, state = stub
    with pytest.raises(CommandError, match=message):
        run("send", "w1", "calculate", params, broker=url)
    assert state.received == []  # refused before anything was sent


def test_http_error_status_shows_the_servers_error(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    with pytest.raises(CommandError, match="^Internal error: kaboom$"):
        run("send", "w1", "explode", broker=url)


def test_call_success(stub: tuple[str, StubState]) -> None:
    url, state = stub
    out, _ = run("call", "echo", '{"message": "Hello World"}', broker=url)
    response = json.loads(out)
    assert response["success"] and response["data"] == "Echo: Hello World"
    assert response["processed_by"] == "w1"
    assert state.last() == {"command": "echo", "data": {"message": "Hello World"}}


def test_call_failure_exits_nonzero(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    with pytest.raises(CommandError, match="nothing failed: No available workers"):
        run("call", "nothing", broker=url)


def test_call_bad_json(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    with pytest.raises(CommandError, match="DATA is not valid JSON"):
        run("call", "echo", "{'single': 'quotes'}", broker=url)


# --------------------------------------------------------------------------- where, who


@pytest.mark.parametrize("command, options", [
    (("workers",), {}), (("broadcast", "hi"), {}), (("send", "w1", "get_time"), {}),
    (("call", "echo"), {}), (("console",), {"stdin": StringIO("list\n")}),
])
def test_unreachable_broker_is_a_clear_error(dead_url: str, command: tuple[str, ...],
                                             options: dict[str, Any]) -> None:
    with pytest.raises(CommandError) as info:
        run(*command, broker=dead_url, **options)
    message = str(info.value)
    assert message.startswith(f"Cannot reach the broker at {dead_url}: ")
    assert message.endswith("Is it running? (python manage.py runbroker)")


def test_unreachable_broker_exits_nonzero_from_the_shell(dead_url: str) -> None:
    env = {**os.environ, "BROKER_URL": dead_url, "DJANGO_SETTINGS_MODULE": "brokersite.settings"}
    proc = subprocess.run([sys.executable, "manage.py", "workers"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"Cannot reach the broker at {dead_url}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_broker_url_and_token_from_the_environment(stub: tuple[str, StubState],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = stub
    state.token = "s3cret"
    monkeypatch.setenv("BROKER_URL", url)
    monkeypatch.setenv("BROKER_API_TOKEN", "s3cret")
    run("workers")
    assert state.received[-1][3] == "Bearer s3cret"


def test_wrong_token_shows_the_servers_error(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.token = "s3cret"
    with pytest.raises(CommandError, match="^Missing or invalid API token$"):
        run("workers", broker=url, token="wrong")
    assert state.received[-1][3] == "Bearer wrong"


def test_default_url_is_the_local_http_port(monkeypatch: pytest.MonkeyPatch,
                                            settings: Any) -> None:
    from dispatch.control.client import default_base_url

    settings.BROKER = {**settings.BROKER, "HTTP_PORT": "8123"}
    assert default_base_url() == "http://127.0.0.1:8123"
    monkeypatch.setenv("BROKER_URL", "http://broker.example:9000")
    assert default_base_url() == "http://broker.example:9000"


# --------------------------------------------------------------------------- client


def test_client_timeout_is_unreachable(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.delay = 1.0
    with pytest.raises(BrokerUnreachable, match="timed out"):
        BrokerClient(url, timeout=0.2).health()


def test_client_waits_longer_than_the_requests_own_timeout(
        stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.delay = 0.4
    response = BrokerClient(url, timeout=0.2).call("echo", {"message": "x"}, timeout=0.1)
    assert response["success"]


def test_client_unknown_endpoint_is_broker_error(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    client = BrokerClient(url + "/nested/")
    with pytest.raises(BrokerError) as info:
        client.health()
    assert info.value.status == 404 and "No such endpoint" in str(info.value)


def test_client_methods(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    client = BrokerClient(url)
    assert client.health()["status"] == "ok"
    assert [w["worker_id"] for w in client.workers()] == ["w1", "w2"]
    assert client.broadcast({"x": 1}) == 2
    assert client.send("w1", "calculate", {"a": 1, "b": 2})["data"] == 3


# --------------------------------------------------------------------------- console


def console(url: str, script: str) -> tuple[str, str]:
    return run("console", broker=url, stdin=StringIO(script))


def test_console_session(stub: tuple[str, StubState]) -> None:
    url, state = stub
    out, err = console(url, "\n".join([
        "help",
        "list",
        'send w1 calculate {"a": 10, "b": 20, "op": "+"}',
        'call echo {"message": "Hello World"}',
        "broadcast maintenance at noon",
        "quit",
        "broadcast never sent",
    ]) + "\n")
    assert out.startswith(f"Connected to {url} (broker-a, 2 workers online).")
    assert "send <client_id> <action> [params]" in out
    assert "3/8" in out and " draining " in out
    assert '"data": 30' in out and '"data": "Echo: Hello World"' in out
    assert "Sent to 2 workers." in out
    assert err == ""
    broadcasts = [r[2] for r in state.received if r[1] == "/api/broadcast"]
    assert broadcasts == [{"message": "maintenance at noon"}]


def test_console_goes_on_after_bad_input(stub: tuple[str, StubState]) -> None:
    url, _ = stub
    out, err = console(url, "\n".join([
        "frobnicate",
        "send w1",
        "send w1 calculate {broken",
        "call",
        "broadcast",
        "send w1 explode",
        "send nobody get_time",
        "",
        "call echo",
    ]))  # no trailing newline, no quit: end of input ends it
    assert err.splitlines() == [
        "Error: Unknown command 'frobnicate'. Type 'help' for commands.",
        "Error: Usage: send <client_id> <action> [params]",
        err.splitlines()[2],
        "Error: Usage: call <command> [data]",
        "Error: Usage: broadcast <message>",
        "Error: Internal error: kaboom",
    ]
    assert err.splitlines()[2].startswith("Error: params is not valid JSON")
    assert "Unknown worker 'nobody'" in out  # a failed request is shown, not fatal
    assert '"data": "Echo: None"' in out


# --------------------------------------------------------------------------- token


@pytest.mark.django_db
def test_the_first_credential_says_what_it_does_to_the_fleet_and_asks_at_a_terminal(
        stub: tuple[str, StubState], monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.management import call_command

    from dispatch.models import Credential

    url, _ = stub  # a broker with 2 workers connected
    monkeypatch.setenv("BROKER_URL", url)

    class Terminal(StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    err = StringIO()
    with pytest.raises(CommandError, match="stays in protected mode"):
        call_command("token", "create", "admin", "ops", stdout=StringIO(), stderr=err)
    assert not Credential.objects.exists()
    warning = err.getvalue()
    assert "ends protected mode" in warning and "2 worker(s) connected now" in warning
    assert "token create worker NAME" in warning and "--token T" in warning
    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    out = StringIO()
    call_command("token", "create", "admin", "ops", stdout=out, stderr=StringIO())
    assert out.getvalue().startswith("adm_") and Credential.objects.count() == 1
    err = StringIO()  # the next one ends nothing: no warning, no question
    call_command("token", "create", "worker", "fleet", stdout=StringIO(), stderr=err)
    assert "protected mode" not in err.getvalue()
    listed = StringIO()
    call_command("token", "list", stdout=listed)
    header, *rows = listed.getvalue().splitlines()
    assert header.split() == ["NAME", "KIND", "STATE", "KEY", "ID", "POOLS", "LIMITS"]
    assert [r.split()[:3] for r in rows] == [["fleet", "worker", "active"],
                                            ["ops", "admin", "active"]]


@pytest.mark.django_db
def test_a_script_creating_the_first_credential_is_warned_not_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.management import call_command

    monkeypatch.setenv("BROKER_URL", "http://127.0.0.1:9")  # nobody there
    monkeypatch.setattr("sys.stdin", StringIO(""))  # not a terminal
    err = StringIO()
    call_command("token", "create", "worker", "fleet", stdout=StringIO(), stderr=err)
    assert "No broker answered" in err.getvalue() and "ends protected mode" in err.getvalue()


def runbroker_refused(env: dict[str, str]) -> str:
    """``runbroker`` with ``env`` that must not start: exit 1, and its one line."""
    from tests.procs import ROOT

    done = subprocess.run(
        [sys.executable, "manage.py", "runbroker", "--worker-port", "0", "--requester-port",
         "0", "--http-port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **env})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    return line


def test_a_database_that_cannot_be_reached_is_one_line_and_exit_1() -> None:
    """The cluster's DATABASE_URL naming a server that refuses (or a role that does not
    exist): runbroker says which database and what it said, in one line, not a
    driver's traceback."""
    from tests.procs import closed_port

    with closed_port() as port:
        line = runbroker_refused(
            {"DATABASE_URL": f"postgres://broker:secret@127.0.0.1:{port}/fleet"})
    assert "Cannot use the database fleet (postgresql, host 127.0.0.1)" in line
    assert "DATABASE_URL" in line and "docs/scaling.md" in line


def test_a_second_embedded_broker_on_the_same_database_is_refused(broker_factory) -> None:
    """It would take the first's requests over and mark its workers offline."""
    first = broker_factory()
    line = runbroker_refused({"DATABASE_URL": f"sqlite:///{first.db_path}"})
    assert f"Another broker (pid {first.proc.pid}) runs on the database" in line
    assert first.get("/healthz")["status"] == "ok"  # the first goes on


def test_redis_that_cannot_be_reached_is_one_line_and_exit_1() -> None:
    from tests.procs import closed_port

    with closed_port() as port:
        line = runbroker_refused({"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert f"Cannot reach Redis (redis://127.0.0.1:{port}/0)" in line and "REDIS_URL" in line
