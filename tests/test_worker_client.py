"""The worker runtime against a fake broker on a real socket, and its CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fakebroker import WAIT, FakeBroker, FakeConnection
from workers.__main__ import load_handlers
from workers.client import SHUTTING_DOWN, STOPPED, Worker, backoff
from workers.handlers import CommandRegistry
from workers.protocol import Message
from workers.requester import ConnectionLost, RequestFailed

ROOT = Path(__file__).resolve().parent.parent

StartWorker = Callable[..., Awaitable[Worker]]


def make_registry() -> CommandRegistry:
    """A few commands whose behaviour the tests can see from the broker's side."""
    reg = CommandRegistry()

    @reg.command()
    async def echo(message: Any = "") -> str:
        return f"Echo: {message}"

    @reg.command()
    async def sleep_then(value: Any, seconds: float) -> Any:
        await asyncio.sleep(seconds)
        return value

    @reg.command()
    async def boom() -> None:
        raise ValueError("bad input")

    @reg.command()
    async def not_json() -> object:
        return object()

    return reg


@pytest.fixture
async def broker() -> AsyncIterator[FakeBroker]:
    async with FakeBroker() as fake:
        yield fake


@pytest.fixture
async def start_worker() -> AsyncIterator[StartWorker]:
    """Start workers with fast backoff; stop them all at the end of the test."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(urls: str | list[str], registry: CommandRegistry | None = None,
                    **options: Any) -> Worker:
        options = {"backoff_initial": 0.01, "backoff_max": 0.05, "name": "test-worker",
                   **options}
        worker = Worker(urls, registry=registry or make_registry(), **options)
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, task in running:
        await asyncio.wait_for(worker.stop(timeout=0.5), WAIT)
        await asyncio.wait_for(task, WAIT)


async def ask(conn: FakeConnection, action: str, params: dict[str, Any] | None = None,
              timeout: float = WAIT) -> dict[str, Any]:
    """Send a request as the broker does and return the data of the worker's response."""
    req = Message.request(action, params)
    await conn.send(req)
    async with asyncio.timeout(timeout):
        while True:
            msg = await conn.recv("response")
            if msg.data["request_id"] == req.msg_id:
                return msg.data


# --------------------------------------------------------------------------- registration


async def test_registers_with_its_commands_and_settings(broker: FakeBroker,
                                                        start_worker: StartWorker) -> None:
    worker = await start_worker(broker.url, weight=2.5, max_concurrency=3)
    conn = await broker.next_connection()
    assert conn.hello.type == "connect"
    schemas = conn.hello.data.pop("schemas")
    assert conn.hello.data == {"worker_id": worker.worker_id, "name": "test-worker",
                               "commands": ["boom", "echo", "not_json", "sleep_then"],
                               "weight": 2.5, "max_concurrency": 3, "no_retry": [],
                               "features": ["batch", "quiet_heartbeat", "resume"]}
    assert sorted(schemas) == ["boom", "echo", "not_json", "sleep_then"]
    assert schemas["sleep_then"] == {"params": [
        {"name": "value", "type": "Any", "required": True},
        {"name": "seconds", "type": "float", "required": True}], "returns": "Any"}
    await asyncio.wait_for(worker.connected.wait(), WAIT)


def test_schemas_the_broker_did_not_keep_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker("ws://127.0.0.1:1/")
    worker._adopt({"worker_id": "w1", "heartbeat_interval": 5.0,
                   "schemas_dropped": ["schema of 'x': 'params' must be a list\x1b"]})
    assert "did not keep some command schemas: schema of 'x': 'params' must be a " \
           "list\\x1b" in caplog.text



def test_default_name_and_builtin_commands() -> None:
    worker = Worker("ws://127.0.0.1:8765/")
    assert worker.name == f"{socket.gethostname()}-{os.getpid()}"
    assert {"get_time", "echo", "calculate"} <= set(worker.registry.names())


async def test_adopts_the_id_and_heartbeat_interval_the_broker_assigns(
        start_worker: StartWorker) -> None:
    async with FakeBroker(assign_id="broker-7", heartbeat_interval=0.05) as fake:
        worker = await start_worker(fake.url)
        conn = await fake.next_connection()
        beat = await conn.recv("heartbeat", timeout=1)
        assert beat.data == {"in_flight": 0}
        assert worker.worker_id == "broker-7"
        assert worker.heartbeat_interval == 0.05


async def test_refused_registration_is_logged_and_retried(
        broker: FakeBroker, start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.client")
    broker.refuse = "Duplicate worker id"
    worker = await start_worker(broker.url)
    async with asyncio.timeout(WAIT):
        while len(broker.hellos) < 2:
            await asyncio.sleep(0.01)
    broker.refuse = None
    conn = await broker.next_connection()
    assert conn.hello.data["worker_id"] == worker.worker_id
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "Duplicate worker id" in errors[0].getMessage()
    assert any("reconnecting in" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)


async def test_a_worker_whose_id_is_taken_registers_under_a_new_one(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    """4409: the id belongs to another credential; retrying it would never succeed."""
    broker.refuse, broker.refuse_code = "Worker id 'x' belongs to another credential", 4409
    worker = await start_worker(broker.url)
    async with asyncio.timeout(WAIT):
        while len(broker.hellos) < 1:
            await asyncio.sleep(0.01)
    first_id = broker.hellos[0].data["worker_id"]
    broker.refuse = None
    conn = await broker.next_connection()
    assert conn.hello.data["worker_id"] != first_id == broker.hellos[0].data["worker_id"]
    assert worker.worker_id == conn.hello.data["worker_id"]


async def test_an_ordinary_refusal_keeps_the_worker_id(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    broker.refuse, broker.refuse_code = "Bad registration: something", 4002
    await start_worker(broker.url)
    async with asyncio.timeout(WAIT):
        while len(broker.hellos) < 2:
            await asyncio.sleep(0.01)
    assert broker.hellos[0].data["worker_id"] == broker.hellos[1].data["worker_id"]


# --------------------------------------------------------------------------- frame -> reaction


def test_what_each_frame_from_the_broker_asks_for() -> None:
    from workers.protocol import ErrorCode, RequestBody, ResponseBody
    from workers.session import Handle, Ignore, Leave, Reply, Resolve, Run, react

    def of(msg: Message, stopping: bool = False, handled: set[str] | None = None) -> object:
        return react(msg, stopping=stopping, handled=handled or set(), in_flight=2)

    ping = Message.heartbeat()
    reply = of(ping)
    assert isinstance(reply, Reply) and reply.message.data == {"ack": ping.msg_id,
                                                               "in_flight": 2}
    assert isinstance(of(Message.heartbeat(ack="x")), Ignore)
    job = Message.request("echo", {"message": "hi"})
    assert of(job) == Run(job.msg_id, RequestBody("echo", {"message": "hi"}))
    refused = of(job, stopping=True)
    assert isinstance(refused, Reply)
    assert (refused.message.data["error"], refused.message.data["code"]) == (
        SHUTTING_DOWN, ErrorCode.WORKER_STOPPING.value)
    bad = of(Message("request", {"params": {}}))
    assert isinstance(bad, Reply) and bad.message.data["code"] == "bad_request"
    answer = Message.response("mine", True, 42)
    assert of(answer) == Resolve("mine", ResponseBody("mine", True, 42, None, None))
    about = of(Message.error("no", reply_to="mine", code=ErrorCode.BAD_REQUEST))
    assert about == Resolve("mine", ResponseBody("mine", False, None, "no", "bad_request"))
    assert isinstance(of(Message.error("no")), Handle)
    assert isinstance(of(Message.notification("hello")), Handle)
    assert of(Message("disconnect", {"reason": "bye"})) == Leave("bye")
    assert isinstance(of(Message("connect", {})), Ignore)
    custom = Message("custom", {"x": 1})
    assert of(custom, handled={"custom"}) == Handle(custom, reply_on_error=True)
    unknown = of(custom)
    assert isinstance(unknown, Reply) and unknown.message.type == "error"


# --------------------------------------------------------------------------- heartbeats


async def test_answers_the_brokers_ping(broker: FakeBroker, start_worker: StartWorker) -> None:
    await start_worker(broker.url)
    conn = await broker.next_connection()
    ping = Message.heartbeat()
    await conn.send(ping)
    pong = await conn.recv("heartbeat")
    assert pong.data == {"ack": ping.msg_id, "in_flight": 0}


async def test_heartbeat_reports_requests_in_flight(start_worker: StartWorker) -> None:
    async with FakeBroker(heartbeat_interval=0.05) as fake:
        await start_worker(fake.url)
        conn = await fake.next_connection()
        await conn.send(Message.request("sleep_then", {"value": 1, "seconds": 0.5}))
        async with asyncio.timeout(1):
            while (await conn.recv("heartbeat")).data.get("in_flight") != 1:
                pass


async def test_silent_broker_is_dropped_and_redialled(
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="workers.client")
    async with FakeBroker(heartbeat_interval=0.05) as fake:
        fake.silent = True
        worker = await start_worker(fake.url)
        first = await fake.next_connection()
        fake.silent = False
        started = time.monotonic()
        await first.wait_closed(timeout=1)
        assert time.monotonic() - started >= 0.1  # it waited for 3 missed intervals
        second = await fake.next_connection()
        assert second.hello.data["worker_id"] == worker.worker_id
        assert any("Nothing from the broker" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- reconnecting


async def test_reconnects_and_reregisters_after_broker_restart(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    worker = await start_worker(broker.url)
    first = await broker.next_connection()
    await broker.stop()
    await first.wait_closed()
    await asyncio.sleep(0.1)  # a few failed dials while the broker is down
    await broker.start()
    second = await broker.next_connection()
    assert second.hello.data == first.hello.data
    assert second.hello.data["worker_id"] == worker.worker_id
    answer = await ask(second, "echo", {"message": "again"})
    assert answer["success"] and answer["data"] == "Echo: again"


async def test_broker_disconnect_makes_the_worker_come_back(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    await start_worker(broker.url)
    first = await broker.next_connection()
    await first.send(Message("disconnect", {"reason": "broker restarting"}))
    await first.wait_closed()
    second = await broker.next_connection()
    assert second.hello.data == first.hello.data


async def test_rotates_through_broker_urls(start_worker: StartWorker) -> None:
    async with FakeBroker() as one, FakeBroker() as two:
        await start_worker([one.url, two.url])
        first = await one.next_connection()
        await first.send(Message("disconnect", {}))
        second = await two.next_connection()
        assert second.hello.data["worker_id"] == first.hello.data["worker_id"]


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    delays = backoff(1.0, 8.0)
    assert 0 <= next(delays) <= 1.0
    later = [next(delays) for _ in range(8)]
    assert 0.5 <= later[0] <= 1.0 and 1.0 <= later[1] <= 2.0
    assert all(4.0 <= d <= 8.0 for d in later[4:])
    assert len({round(d, 6) for d in later}) > 1  # jittered, not a fixed ladder


def test_rejects_bad_urls_and_settings() -> None:
    with pytest.raises(ValueError, match="Not a WebSocket URL"):
        Worker("http://localhost:8765/", registry=CommandRegistry())
    with pytest.raises(ValueError):
        Worker([], registry=CommandRegistry())
    with pytest.raises(ValueError):
        Worker("ws://x/", registry=CommandRegistry(), weight=0)


# --------------------------------------------------------------------------- requests


async def test_runs_requests_concurrently_and_answers_each(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    await start_worker(broker.url)
    conn = await broker.next_connection()
    ids = {}
    started = time.monotonic()
    for n in range(10):  # the first sent sleeps longest, so answers come back reversed
        req = Message.request("sleep_then", {"value": n, "seconds": 0.3 - n * 0.02})
        ids[req.msg_id] = n
        await conn.send(req)
    answers = [(await conn.recv("response")).data for _ in range(10)]
    assert time.monotonic() - started < 1.0  # not 10 x 0.2 s in a row
    assert all(a["success"] and a["data"] == ids[a["request_id"]] for a in answers)
    assert [a["data"] for a in answers] == list(range(9, -1, -1))


async def test_max_concurrency_is_enforced(broker: FakeBroker,
                                           start_worker: StartWorker) -> None:
    reg = CommandRegistry()
    running, peak = 0, 0

    @reg.command()
    async def busy() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    await start_worker(broker.url, registry=reg, max_concurrency=2)
    conn = await broker.next_connection()
    for _ in range(6):
        await conn.send(Message.request("busy"))
    for _ in range(6):
        assert (await conn.recv("response")).data["success"]
    assert peak == 2


async def test_failures_become_error_answers_and_the_worker_lives_on(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    await start_worker(broker.url)
    conn = await broker.next_connection()
    boom = await ask(conn, "boom")
    assert (boom["success"], boom["data"], boom["error"]) == (False, None, "ValueError: bad input")
    assert (await ask(conn, "nope"))["error"] == "Unknown command 'nope'"
    assert (await ask(conn, "echo", {"wrong": 1}))["error"].startswith(
        "Bad parameters for 'echo'")
    assert (await ask(conn, "not_json"))["error"].startswith("Result is not JSON serializable")
    bad = Message("request", {"params": {}})
    await conn.send(bad)
    answer = await conn.recv("response")
    assert answer.data["request_id"] == bad.msg_id
    assert answer.data["error"] == "Missing field 'action'"
    assert (await ask(conn, "echo", {"message": "still here"}))["data"] == "Echo: still here"


async def test_sync_handler_does_not_block_the_worker(broker: FakeBroker,
                                                      start_worker: StartWorker) -> None:
    reg = CommandRegistry()
    release = threading.Event()

    @reg.command()
    def blocking() -> str:
        release.wait(WAIT)
        return "released"

    await start_worker(broker.url, registry=reg)
    conn = await broker.next_connection()
    req = Message.request("blocking")
    await conn.send(req)
    ping = Message.heartbeat()
    await conn.send(ping)
    pong = await conn.recv("heartbeat", timeout=1)  # answered while the handler blocks
    assert pong.data == {"ack": ping.msg_id, "in_flight": 1}
    release.set()
    answer = await conn.recv("response")
    assert answer.data["request_id"] == req.msg_id and answer.data["data"] == "released"


# --------------------------------------------------------------------------- other frames


async def test_custom_message_handlers(broker: FakeBroker, start_worker: StartWorker) -> None:
    worker = await start_worker(broker.url)
    threads: list[str] = []

    @worker.on("custom")
    async def reply(msg: Message) -> Message:
        return Message("custom", {"echo": msg.data["text"]})

    @worker.on("resize")
    def resize(msg: Message) -> None:
        threads.append(threading.current_thread().name)
        raise RuntimeError("no such image")

    conn = await broker.next_connection()
    await conn.send(Message("custom", {"text": "hi"}))
    assert (await conn.recv("custom")).data == {"echo": "hi"}
    job = Message("resize", {})
    await conn.send(job)
    error = await conn.recv("error")
    assert error.data == {"error": "Handler for 'resize' failed: RuntimeError: no such image",
                          "reply_to": job.msg_id, "code": "handler_failed"}
    assert threads and threads[0] != threading.current_thread().name


async def test_unknown_and_unreadable_frames_get_error_frames(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    await start_worker(broker.url)
    conn = await broker.next_connection()
    odd = Message("bogus", {})
    await conn.send(odd)
    error = await conn.recv("error")
    assert error.data == {"error": "Unknown message type 'bogus'", "reply_to": odd.msg_id,
                          "code": "bad_request"}
    await conn.send("this is not json")
    error = await conn.recv("error")
    assert error.data["error"].startswith("Unreadable frame: Malformed JSON")
    assert (await ask(conn, "echo", {"message": 1}))["data"] == "Echo: 1"


async def test_notifications_are_logged_and_passed_to_callbacks(
        broker: FakeBroker, start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.client")
    worker = await start_worker(broker.url)
    heard: asyncio.Queue[Message] = asyncio.Queue()
    worker.on("notification")(heard.put)
    conn = await broker.next_connection()
    await conn.send(Message.notification("maintenance at noon"))
    msg = await asyncio.wait_for(heard.get(), WAIT)
    assert msg.data["message"] == "maintenance at noon"
    assert any("maintenance at noon" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)


def test_reserved_types_cannot_be_taken_over() -> None:
    worker = Worker("ws://127.0.0.1:1/", registry=CommandRegistry())
    with pytest.raises(ValueError):
        worker.on("request")


# --------------------------------------------------------------------------- worker -> broker


async def test_worker_request_round_trip(broker: FakeBroker, start_worker: StartWorker) -> None:
    worker = await start_worker(broker.url)
    conn = await broker.next_connection()

    async def serve_three() -> None:
        req = await conn.recv("request")
        assert req.data == {"action": "get_time", "params": {}}
        await conn.send(Message.response(req.msg_id, True, "2025-10-20 15:30:45"))
        req = await conn.recv("request")
        await conn.send(Message.response(req.msg_id, False, error="Unknown action 'x'"))
        req = await conn.recv("request")
        await conn.send(Message.error("Bad params", reply_to=req.msg_id))

    server = asyncio.create_task(serve_three())
    assert await worker.request("get_time", timeout=WAIT) == "2025-10-20 15:30:45"
    with pytest.raises(RequestFailed) as info:
        await worker.request("x", timeout=WAIT)
    assert info.value.error == "Unknown action 'x'"
    with pytest.raises(RequestFailed, match="Bad params"):
        await worker.request("calculate", {"a": "?"}, timeout=WAIT)
    await asyncio.wait_for(server, WAIT)
    with pytest.raises(TimeoutError):
        await worker.request("get_time", timeout=0.1)  # the broker never answers this one


async def test_worker_request_fails_when_the_connection_drops(
        broker: FakeBroker, start_worker: StartWorker) -> None:
    worker = await start_worker(broker.url)
    conn = await broker.next_connection()
    pending = asyncio.create_task(worker.request("get_time", timeout=WAIT))
    await conn.recv("request")
    await conn.ws.close()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(pending, WAIT)


# --------------------------------------------------------------------------- stopping


async def test_graceful_stop_finishes_work_in_flight(broker: FakeBroker) -> None:
    worker = Worker(broker.url, registry=make_registry(), name="w")
    run = asyncio.create_task(worker.run())
    conn = await broker.next_connection()
    slow = Message.request("sleep_then", {"value": "finished", "seconds": 0.3})
    await conn.send(slow)
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(worker.stop())
    assert (await conn.recv("disconnect", "response")).type == "disconnect"
    late = Message.request("echo", {"message": "too late"})
    await conn.send(late)
    refused = await conn.recv("response")
    assert refused.data["request_id"] == late.msg_id and refused.data["error"] == SHUTTING_DOWN
    done = await conn.recv("response")
    assert done.data["request_id"] == slow.msg_id and done.data["data"] == "finished"
    await conn.wait_closed()
    await asyncio.wait_for(stopping, WAIT)
    await asyncio.wait_for(run, WAIT)
    assert not worker.connected.is_set()


async def test_stop_deadline_cancels_and_answers_what_is_left(broker: FakeBroker) -> None:
    worker = Worker(broker.url, registry=make_registry())
    run = asyncio.create_task(worker.run())
    conn = await broker.next_connection()
    stuck = Message.request("sleep_then", {"value": 0, "seconds": 60})
    await conn.send(stuck)
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await asyncio.wait_for(worker.stop(timeout=0.1), WAIT)
    assert time.monotonic() - started < 1.5
    answer = await conn.recv("response")
    assert answer.data["request_id"] == stuck.msg_id and answer.data["error"] == STOPPED
    await asyncio.wait_for(run, WAIT)


async def test_stop_while_registering_does_not_wait_for_the_broker(broker: FakeBroker) -> None:
    broker.mute = True  # accepts the socket, never answers 'connect'
    worker = Worker(broker.url, registry=CommandRegistry())
    run = asyncio.create_task(worker.run())
    async with asyncio.timeout(WAIT):
        while not broker.hellos:
            await asyncio.sleep(0.01)
    started = time.monotonic()
    await asyncio.wait_for(worker.stop(), WAIT)
    await asyncio.wait_for(run, WAIT)
    assert time.monotonic() - started < 1.0


async def test_stop_while_the_broker_is_down_returns_promptly() -> None:
    worker = Worker("ws://127.0.0.1:9/", registry=CommandRegistry(), backoff_initial=5,
                    backoff_max=5)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.1)
    await asyncio.wait_for(worker.stop(), WAIT)
    await asyncio.wait_for(run, WAIT)


# --------------------------------------------------------------------------- CLI


HANDLERS_MODULE = textwrap.dedent('''
    from workers.handlers import command

    @command()
    def triple(x: int) -> int:
        return 3 * x
''')


async def start_cli(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    (tmp_path / "cli_handlers.py").write_text(HANDLERS_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers", *args, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_cli_serves_user_handlers_and_stops_on_sigterm(broker: FakeBroker,
                                                             tmp_path: Path) -> None:
    proc = await start_cli(tmp_path, "127.0.0.1", str(broker.port), "--name", "cli-worker",
                           "--weight", "3", "--max-concurrency", "4",
                           "--handlers", "cli_handlers")
    try:
        conn = await broker.next_connection(timeout=10)
        assert conn.hello.data["name"] == "cli-worker"
        assert conn.hello.data["weight"] == 3.0 and conn.hello.data["max_concurrency"] == 4
        assert {"triple", "get_time", "calculate"} <= set(conn.hello.data["commands"])
        assert (await ask(conn, "triple", {"x": 14}))["data"] == 42
        assert (await ask(conn, "calculate", {"a": 10, "b": 20, "op": "+"}))["data"] == 30
        proc.send_signal(signal.SIGTERM)
        assert (await conn.recv("disconnect")).type == "disconnect"
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    log = stderr.decode()
    assert "INFO" in log and "SIGTERM received" in log
    assert log.splitlines()[0][:4].isdigit()  # lines start with a timestamp


async def test_cli_accepts_a_url_and_stops_on_sigint(broker: FakeBroker,
                                                     tmp_path: Path) -> None:
    proc = await start_cli(tmp_path, broker.url, "--log-level", "WARNING")
    try:
        conn = await broker.next_connection(timeout=10)
        proc.send_signal(signal.SIGINT)
        await conn.recv("disconnect")
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def test_cli_help_and_bad_handlers(tmp_path: Path) -> None:
    proc = await start_cli(tmp_path, "--help")
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    for option in ("--name", "--weight", "--max-concurrency", "--handlers", "--log-level",
                   "--url"):
        assert option in out.decode()
    proc = await start_cli(tmp_path, "--handlers", "no_such_module_here")
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2 and "cannot load handlers 'no_such_module_here'" in err.decode()


def test_handlers_can_be_loaded_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file_handlers.py"
    path.write_text("VALUE = 42\n")
    assert load_handlers(str(path)).VALUE == 42
