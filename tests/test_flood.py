"""A flood of malformed frames at a real broker: every one answered, nothing else hurt.

One client sends 10,000 frames of every malformed kind over both sockets at once (5,000
to the requester socket, 5,000 to a registered worker connection) while a real worker
serves a real requester beside it. The figures (messages, answers, broker RSS before and
after) are attached to the test report (``record_property``) and logged, so
``./test.sh tests/test_flood.py -o log_cli=true`` shows them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import Counter
from typing import Callable

import psutil
import pytest
import websockets

from tests.procs import Broker, WorkerProc, until
from workers.protocol import Message, Registration
from workers.requester import Requester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
log = logging.getLogger("tests.flood")

LIMIT = 1024  # BROKER_MAX_MESSAGE_BYTES: "just over the limit" stays cheap
PER_SOCKET = 5_000
RSS_GROWTH_LIMIT_MB = 50
FLOOD_SECONDS = 45  # every answer must be in by then

Frame = tuple[str | bytes, str]  # what is sent, and a piece of the error it must get


def oversized(i: int, make: Callable[[str], str]) -> Frame:
    """A frame 1 to 64 bytes over the limit (daphne passes those on to the broker)."""
    base = make("")
    text = make("x" * (LIMIT - len(base.encode()) + 1 + i % 64))
    return text, f"Message too large: {len(text.encode())} bytes (limit {LIMIT})"


def requester_frame(i: int) -> Frame:
    """The i-th malformed frame for the requester socket, cycling through the kinds."""
    kinds: list[Callable[[], Frame]] = [
        lambda: (f'{{"request_id": "r{i}", "command": "echo", "data": {{', "Malformed JSON"),
        lambda: (f'"{i}"', "Expected a JSON object, got str"),  # (an array is a batch)
        lambda: ("null" if i % 2 else f"{i}", "Expected a JSON object"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": i}),
                 "Field 'command' must be str, got int"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": "echo", "data": [i]}),
                 "Field 'data' must be dict, got list"),
        lambda: (json.dumps({"request_id": i, "command": "echo"}),
                 "Field 'request_id' must be str"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": "echo", "timeout": "5"}),
                 "Field 'timeout' must be int or float, got str"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": "echo", "timeout": -i}),
                 "Field 'timeout' must be between 0 and 2592000 seconds"),
        lambda: (json.dumps({"request_id": f"r{i}"}), "Missing field 'command'"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": ""}),
                 "Field 'command' must not be empty"),
        lambda: (json.dumps({"request_id": f"r{i}", "command": f"no_such_command_{i}"}),
                 "No available workers"),
        lambda: (bytes([i % 256]) * (i % 50 + 1),
                 "Binary frames are not supported: send JSON as text"),
        lambda: (b'{"command": "echo"}', "Binary frames are not supported"),
        lambda: oversized(i, lambda pad: json.dumps({"request_id": f"r{i}", "command": "echo",
                                                     "data": {"pad": pad}})),
        lambda: ("[" * (i % 900 + 100), "Malformed JSON"),
    ]
    return kinds[i % len(kinds)]()


def worker_frame(i: int) -> Frame:
    """The i-th malformed frame for a registered worker connection."""
    kinds: list[Callable[[], Frame]] = [
        lambda: (f'{{"type": "heartbeat", "msg_id": "m{i}", "data": {{', "Malformed JSON"),
        lambda: (f'["heartbeat", {i}]', "Expected a JSON object, got list"),
        lambda: (json.dumps({"type": f"teleport_{i}", "msg_id": f"m{i}", "data": {}}),
                 f"Unknown message type 'teleport_{i}'"),
        lambda: (json.dumps({"type": "custom", "msg_id": f"m{i}", "data": {}}),
                 "Unknown message type 'custom'"),
        lambda: (json.dumps({"type": i, "data": {}}), "Field 'type' must be str, got int"),
        lambda: (json.dumps({"type": "", "data": {}}), "Field 'type' must not be empty"),
        lambda: (json.dumps({"msg_id": f"m{i}", "data": {}}), "Missing field 'type'"),
        lambda: (json.dumps({"type": "heartbeat", "data": [i]}),
                 "Field 'data' must be dict, got list"),
        lambda: (json.dumps({"type": "heartbeat", "msg_id": i}),
                 "Field 'msg_id' must be str, got int"),
        lambda: (json.dumps({"type": "heartbeat", "timestamp": "now"}),
                 "Field 'timestamp' must be int or float, got str"),
        lambda: (json.dumps({"type": "response", "msg_id": f"m{i}",
                             "data": {"success": True}}), "Missing field 'request_id'"),
        lambda: (json.dumps({"type": "response", "msg_id": f"m{i}",
                             "data": {"request_id": f"k{i}", "success": "yes"}}),
                 "Field 'success' must be bool, got str"),
        lambda: (json.dumps({"type": "request", "msg_id": f"m{i}", "data": {"params": {}}}),
                 "Missing field 'action'"),
        lambda: (json.dumps({"type": "request", "msg_id": f"m{i}",
                             "data": {"action": "get_time", "params": [i]}}),
                 "Field 'params' must be dict, got list"),
        lambda: (Message("connect", {"commands": ["flood_only"]}).to_json(),
                 "Already registered on this connection"),
        lambda: (bytes([i % 256]) * (i % 50 + 1),
                 "Binary frames are not supported: send JSON as text"),
        lambda: oversized(i, lambda pad: Message("heartbeat", {"pad": pad}, msg_id=f"m{i}",
                                                 timestamp=1.5).to_json()),
    ]
    return kinds[i % len(kinds)]()


async def flood_requester(url: str, frames: list[Frame]) -> list[dict]:
    """Send every frame on one connection; collect as many answers, in order."""
    async with websockets.connect(url + "/ws/requester/") as ws:
        async def send_all() -> None:
            for raw, _ in frames:
                await ws.send(raw)

        sender = asyncio.create_task(send_all())
        answers = [json.loads(await ws.recv()) for _ in frames]
        await sender
        # still usable, and nothing more came: the next frame's answer is its own
        await ws.send(json.dumps({"request_id": "after", "command": "echo",
                                  "data": {"message": "still here"}}))
        answers.append(json.loads(await ws.recv()))
        return answers


async def flood_worker(url: str, frames: list[Frame]) -> list[Message]:
    """Register, send every frame, collect the answers; broker pings are answered, not
    counted, so the connection is not dropped as deaf."""
    async with websockets.connect(url + "/ws/worker/") as ws:
        reg = Registration("flooder", "flooder", ["flood_only"])
        await ws.send(Message("connect", reg.to_data()).to_json())
        assert Message.from_json(await ws.recv()).type == "connect"

        async def send_all() -> None:
            for raw, _ in frames:
                await ws.send(raw)

        sender = asyncio.create_task(send_all())
        answers: list[Message] = []
        while len(answers) < len(frames):
            msg = Message.from_json(await ws.recv())
            if msg.type == "heartbeat" and "ack" not in msg.data:
                await ws.send(Message.heartbeat(ack=msg.msg_id).to_json())
            else:
                answers.append(msg)
        await sender
        # still usable and still registered: the broker lists it to itself
        ask = Message.request("get_client_info")
        await ws.send(ask.to_json())
        while (msg := Message.from_json(await ws.recv())).type == "heartbeat":
            if "ack" not in msg.data:
                await ws.send(Message.heartbeat(ack=msg.msg_id).to_json())
        assert msg.type == "response" and msg.data["request_id"] == ask.msg_id, msg
        assert "flooder" in {w["worker_id"] for w in msg.data["data"]["workers"]}
        return answers


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
async def test_ten_thousand_malformed_frames_are_each_answered_and_hurt_nothing(
        broker_factory: Callable[..., Broker], record_property) -> None:
    # Default heartbeats: with the tests' fast ones (a 2 s window) the flooder's pong
    # waits behind its own 5,000 frames and it is dropped as deaf, which is not the point.
    broker = broker_factory(env={"BROKER_MAX_MESSAGE_BYTES": str(LIMIT),
                                 "BROKER_HEARTBEAT_INTERVAL": "5"})
    worker = WorkerProc(broker, "real").start()
    try:
        await until(lambda: any(w["name"] == "real" for w in broker.workers()), 15,
                    f"worker to register\n{worker.log()}")
        async with Requester(broker.requester_url) as normal:
            assert await normal.call("echo", message="warm-up") == "Echo: warm-up"
            proc = psutil.Process(broker.proc.pid)  # type: ignore[union-attr]
            rss_before = proc.memory_info().rss

            requester_frames = [requester_frame(i) for i in range(PER_SOCKET)]
            worker_frames = [worker_frame(i) for i in range(PER_SOCKET)]
            started = time.monotonic()
            flood = asyncio.gather(flood_requester(broker.requester_url, requester_frames),
                                   flood_worker(broker.worker_url, worker_frames))
            during, slowest = 0, 0.0
            while not flood.done() and time.monotonic() - started < FLOOD_SECONDS:
                sent = time.monotonic()  # normal service goes on meanwhile
                assert await normal.call("echo", message=f"during {during}",
                                         timeout=10) == f"Echo: during {during}"
                slowest = max(slowest, time.monotonic() - sent)
                during += 1
                await asyncio.sleep(0.02)
            requester_answers, worker_answers = await asyncio.wait_for(
                flood, max(1.0, FLOOD_SECONDS - (time.monotonic() - started)))
            seconds = time.monotonic() - started
            rss_after = proc.memory_info().rss

            assert broker.get("/healthz")["status"] == "ok"
            assert await normal.call("echo", message="after") == "Echo: after"
            await until(lambda: [w["name"] for w in broker.workers()] == ["real"], 5,
                        "the flooder to leave the worker list")
    finally:
        worker.stop(signal.SIGKILL)

    after = requester_answers.pop()
    assert after == {"request_id": "after", "success": True, "data": "Echo: still here",
                     "error": None, "processed_by": after["processed_by"]}
    assert len(requester_answers) == PER_SOCKET and len(worker_answers) == PER_SOCKET
    wrong = Counter()
    for (_, error), answer in zip(requester_frames, requester_answers):
        if answer["success"] or answer["data"] is not None or error not in answer["error"]:
            wrong[(error, answer["error"])] += 1
    for (_, error), answer in zip(worker_frames, worker_answers):
        if answer.type != "error" or error not in answer.data["error"]:
            wrong[(error, str(answer.data))] += 1
    assert not wrong, f"answers that do not match their frame: {wrong.most_common(5)}"

    grew_mb = (rss_after - rss_before) / 2**20
    figures = {"messages": 2 * PER_SOCKET, "answers": len(requester_answers)
               + len(worker_answers), "seconds": round(seconds, 2),
               "normal_requests_during_flood": during,
               "slowest_normal_request_ms": round(slowest * 1000, 1),
               "broker_rss_before_mb": round(rss_before / 2**20, 1),
               "broker_rss_after_mb": round(rss_after / 2**20, 1),
               "broker_rss_growth_mb": round(grew_mb, 1)}
    for name, value in figures.items():
        record_property(name, value)
    log.warning("figures: %s", json.dumps(figures))
    assert grew_mb < RSS_GROWTH_LIMIT_MB, figures
