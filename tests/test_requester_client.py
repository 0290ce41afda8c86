"""The requester client (async, sync and CLI) against a fake requester API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from fakebroker import WAIT, failed, fake_api, ok
from workers.requester import (ConnectionLost, Requester, RequestFailed, SyncRequester,
                               broker_url)

ROOT = Path(__file__).resolve().parent.parent


class Api:
    """What the fake broker does with each command; remembers every request it got."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def __call__(self, req: dict[str, Any]) -> dict[str, Any] | None:
        self.received.append(req)
        data = req.get("data", {})
        command = req.get("command")
        if command == "echo":
            return ok(req, f"Echo: {data.get('message', '')}")
        if command == "calculate":
            return ok(req, data["a"] + data["b"])
        if command == "sleep":
            await asyncio.sleep(data["seconds"])
            return ok(req, data["value"], worker=f"w{data['value']}")
        if command == "silent":
            return None
        if command == "unreadable":
            return failed(None, "Malformed JSON: unexpected character")
        return failed(req, "No available workers")


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, Api]]:
    handler = Api()
    async with fake_api(handler) as url:
        yield url, handler


# --------------------------------------------------------------------------- async client


async def test_call_returns_data_and_request_returns_the_whole_answer(
        api: tuple[str, Api]) -> None:
    url, fake = api
    async with Requester(url) as r:
        assert await r.call("echo", message="Hello World") == "Echo: Hello World"
        response = await r.request("calculate", {"a": 10, "b": 20}, timeout=5)
    assert (response.success, response.data, response.error, response.processed_by) == (
        True, 30, None, "w1")
    first, second = fake.received
    assert set(first) == {"request_id", "command", "data"}
    assert first["command"] == "echo" and first["data"] == {"message": "Hello World"}
    assert second["timeout"] == 5 and second["request_id"] != first["request_id"]


async def test_failure_answer_raises_request_failed_from_call_only(
        api: tuple[str, Api]) -> None:
    url, _ = api
    async with Requester(url) as r:
        response = await r.request("resize")
        assert not response.success and response.error == "No available workers"
        with pytest.raises(RequestFailed) as info:
            await r.call("resize", width=10)
    assert info.value.error == "No available workers"
    assert info.value.response.request_id is not None


@pytest.mark.parametrize("batch", [True, False])
async def test_calls_made_together_go_in_one_batch_frame(batch: bool) -> None:
    """A lone call goes at once in its own frame; calls made in one turn of the loop
    while others are in flight go together (a JSON array), unless batches are off;
    answers in batch frames are matched as well."""
    frames: list[str] = []
    async with fake_api(Api(), frames) as url:
        async with Requester(url, batch=batch) as r:
            assert await r.call("echo", message="alone") == "Echo: alone"
            assert json.loads(frames[0])["command"] == "echo"
            echoes = await asyncio.wait_for(asyncio.gather(
                *(r.call("echo", message=str(i)) for i in range(20))), WAIT)
            assert echoes == [f"Echo: {i}" for i in range(20)]
            sent = len(frames)
            waiting = [asyncio.ensure_future(r.call("silent")) for _ in range(2)]
            await asyncio.sleep(0.1)  # the fake answers neither: a batch frame does
            r._calls.on_frame(json.dumps([ok({"request_id": rid}, rid) for rid in r._calls]))
            ids = [req["request_id"] for f in frames[sent:]
                   for req in (json.loads(f) if f.startswith("[") else [json.loads(f)])]
            assert len(ids) == 2 and sorted(await asyncio.gather(*waiting)) == sorted(ids)
    batches = [f for f in frames if f.startswith("[")]
    assert len(frames) < 10 and batches if batch else len(frames) == 23 and not batches


async def test_concurrent_calls_are_matched_out_of_order(api: tuple[str, Api]) -> None:
    url, _ = api
    finished: list[int] = []

    async def one(r: Requester, n: int) -> Any:
        response = await r.request("sleep", {"value": n, "seconds": 0.3 - n * 0.03})
        finished.append(n)
        return response

    async with Requester(url) as r:
        started = time.monotonic()
        responses = await asyncio.wait_for(asyncio.gather(*(one(r, n) for n in range(8))), WAIT)
        assert time.monotonic() - started < 1.0  # in flight together, not one by one
        assert r.in_flight == 0
    assert [resp.data for resp in responses] == list(range(8))
    assert [resp.processed_by for resp in responses] == [f"w{n}" for n in range(8)]
    assert finished == list(range(7, -1, -1))  # answered in reverse order of sending


async def test_unmatchable_error_fails_the_only_waiting_call(api: tuple[str, Api]) -> None:
    url, _ = api
    async with Requester(url) as r:
        with pytest.raises(RequestFailed, match="Malformed JSON"):
            await asyncio.wait_for(r.call("unreadable"), WAIT)


async def test_client_gives_up_after_timeout_plus_margin(api: tuple[str, Api]) -> None:
    url, _ = api
    async with Requester(url, margin=0.05) as r:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="No answer to 'silent'"):
            await r.request("silent", timeout=0.1)
        assert 0.14 <= time.monotonic() - started < 1.0
        assert await r.call("echo", message="ok") == "Echo: ok"  # the connection still works


@contextlib.asynccontextmanager
async def dropping_api(after: int) -> AsyncIterator[str]:
    """A broker that reads ``after`` requests, answers none, and drops the connection."""

    async def handle(ws: ServerConnection) -> None:
        read = 0
        while read < after:
            frame = json.loads(await ws.recv())
            read += len(frame) if isinstance(frame, list) else 1  # a batch, or one
        await ws.close(1011, "broker crashed")

    async with serve(handle, "127.0.0.1", 0) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def test_connection_drop_fails_every_waiting_call() -> None:
    """Without reconnect (and with it, once the broker stays away: see the re-attach
    tests against a real broker)."""
    async with dropping_api(after=3) as url:
        async with Requester(url, reconnect=False) as r:
            calls = [asyncio.create_task(r.call("echo", message=n)) for n in range(3)]
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), WAIT)
            assert all(isinstance(exc, ConnectionLost) for exc in results)
            assert isinstance(results[0], ConnectionError)
            assert "broker crashed" in str(results[0])
            with pytest.raises(ConnectionLost):
                await r.call("echo")


async def test_not_connected_and_unreachable() -> None:
    with pytest.raises(ConnectionLost, match="Not connected"):
        await Requester("ws://127.0.0.1:9/").call("echo")
    with pytest.raises(OSError):
        await Requester("ws://127.0.0.1:9/").connect()


def test_broker_url() -> None:
    assert broker_url("localhost", 8766) == "ws://localhost:8766/"
    assert broker_url("::1", 8766) == "ws://[::1]:8766/"


# --------------------------------------------------------------------------- sync wrapper


async def test_sync_requester_works_from_plain_threads(api: tuple[str, Api]) -> None:
    url, _ = api

    def use() -> tuple[Any, Any, list[Any], str]:
        with SyncRequester(url) as r:
            echoed = r.call("echo", message="sync")
            answer = r.request("calculate", {"a": 1, "b": 2})
            with ThreadPoolExecutor(4) as pool:  # several threads share one connection
                parallel = list(pool.map(
                    lambda n: r.call("sleep", value=n, seconds=0.1), range(4)))
            try:
                r.call("resize")
            except RequestFailed as exc:
                error = exc.error
        return echoed, answer, parallel, error

    echoed, answer, parallel, error = await asyncio.wait_for(asyncio.to_thread(use), WAIT)
    assert echoed == "Echo: sync"
    assert answer.success and answer.data == 3
    assert parallel == [0, 1, 2, 3]
    assert error == "No available workers"


async def test_sync_requester_unreachable_raises_and_cleans_up() -> None:
    def use() -> None:
        SyncRequester("ws://127.0.0.1:9/")

    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.to_thread(use), WAIT)


# --------------------------------------------------------------------------- CLI


async def run_cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.requester", *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(None if stdin is None else stdin.encode()), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def port_of(url: str) -> str:
    return url.rstrip("/").rsplit(":", 1)[1]


async def test_cli_one_shot_success_and_failure(api: tuple[str, Api]) -> None:
    url, fake = api
    code, out, _ = await run_cli("127.0.0.1", port_of(url), "calculate",
                                 '{"a": 10, "b": 20, "op": "+"}', "--timeout", "5")
    assert code == 0
    assert json.loads(out) | {"request_id": None} == {
        "request_id": None, "success": True, "data": 30, "error": None, "processed_by": "w1"}
    assert fake.received[-1]["timeout"] == 5

    code, out, _ = await run_cli("--url", url, "resize")
    assert code == 1 and json.loads(out)["error"] == "No available workers"

    code, out, _ = await run_cli(url, "echo", '{"message": "via url"}')
    assert code == 0 and json.loads(out)["data"] == "Echo: via url"


async def test_cli_unreachable_and_usage_errors() -> None:
    code, out, err = await run_cli("127.0.0.1", "9", "get_time")
    assert code == 2 and out == ""
    assert "Cannot reach the broker at ws://127.0.0.1:9/" in err and "Traceback" not in err
    code, _, err = await run_cli("127.0.0.1", "9", "echo", "{not json")
    assert code == 2 and "bad JSON data" in err
    code, _, err = await run_cli("127.0.0.1", "9", "echo", "[1]")
    assert code == 2 and "must be an object" in err


async def test_cli_interactive_console_on_a_pipe(api: tuple[str, Api]) -> None:
    url, _ = api
    script = "\n".join([
        "help",
        'request echo {"message": "hi"}',
        'request calculate {"a": 10, "b": 20, "op": "+"}',
        "request calculate {bad json",
        "request",
        "",
        "dance",
        "request resize",
        "quit",
        "request echo {\"message\": \"never sent\"}",
    ]) + "\n"
    code, out, err = await run_cli("127.0.0.1", port_of(url), stdin=script)
    assert code == 0 and "Traceback" not in err
    assert "request COMMAND [JSON]" in out  # the help text
    assert '"data": "Echo: hi"' in out and '"data": 30' in out
    assert "Not sent: bad JSON data" in out
    assert "Usage: request COMMAND [JSON]" in out
    assert "Unknown console command 'dance'" in out
    assert '"error": "No available workers"' in out
    assert "never sent" not in out


async def test_cli_console_ends_at_end_of_input_and_reports_a_lost_broker() -> None:
    async with dropping_api(after=1) as url:
        code, out, err = await run_cli(url, stdin="request echo\nrequest echo\n")
    assert code == 2 and "broker crashed" in err and "Traceback" not in err
    async with fake_api(Api()) as url:
        code, out, _ = await run_cli(url, stdin='request echo {"message": 1}\n')
    assert code == 0 and '"data": "Echo: 1"' in out


async def test_closing_after_the_broker_is_gone_returns_at_once() -> None:
    """With nothing in flight, leaving ``async with`` after the broker went away does not
    wait out the reconnect window (it did: 30 s)."""
    async with fake_api(Api()) as url:
        client = await Requester(url, reconnect_for=30).connect()
        assert await client.call("echo", message="up") == "Echo: up"
    await asyncio.sleep(0.2)  # the server is gone: the client is dialling again
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 1
    with pytest.raises(ConnectionLost, match="closed"):  # at once, not after 30 s
        await asyncio.wait_for(client.call("echo", message="after"), 1)



async def test_watching_a_request_sent_on_this_connection_shares_its_one_answer() -> None:
    """``watch`` of a request this connection sent and still waits for: its progress
    and its one answer reach both the job and the watch (the broker answers a
    connection once, however it asked)."""
    from workers.requester import Progress, Result

    async def broker(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if "command" in frame:  # the request: stored at once, answered when watched
                await ws.send(json.dumps({"request_id": frame["request_id"],
                                          "event": "accepted"}))
            elif "attach" in frame:
                rid = frame["attach"]
                await ws.send(json.dumps({"request_id": rid, "event": "progress",
                                          "progress": 0.5}))
                await ws.send(json.dumps(ok({"request_id": rid}, "done")))

    async with serve(broker, "127.0.0.1", 0) as server:
        url = broker_url("127.0.0.1", server.sockets[0].getsockname()[1])
        async with Requester(url) as requester:
            job = await requester.start("train", {})
            answer = asyncio.ensure_future(job.result())
            watched = await requester.watch(job.request_id)
            events = [event async for event in watched.events()]
            assert isinstance(events[0], Progress) and isinstance(events[-1], Result)
            assert events[-1].data == "done"
            assert await asyncio.wait_for(answer, WAIT) == "done"
