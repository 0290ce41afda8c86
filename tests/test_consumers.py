"""Both sockets through Channels' WebsocketCommunicator, in one event loop.

These check the broker's behaviour frame by frame; tests/test_integration.py
checks the same paths again with real processes and sockets.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from dispatch import registry as registry_module
from dispatch.auth import stop_guard
from dispatch.core.dispatcher import get_dispatcher, stop_dispatcher
from dispatch.transport.routing import SocketRouter
from workers.protocol import CloseCode, ErrorCode, Feature, Message, Registration

TIMEOUT = 3

pytestmark = [pytest.mark.timeout(30)]


@pytest.fixture(autouse=True)
async def fresh_broker(async_db: None) -> AsyncIterator[None]:
    """A fresh registry and dispatcher per test, stopped before the database goes."""
    registry_module.reset_registry()
    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 0.2,
                                   "MAX_MESSAGE_BYTES": 4096}):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()


app = SocketRouter()


async def open_socket(path: str, client: str = "127.0.0.1", headers: list | None = None
                      ) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path, headers=headers)
    comm.scope["client"] = (client, 50000)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    return comm


async def frame(comm: WebsocketCommunicator, kind: str | None = None) -> Message:
    """Next envelope, skipping heartbeat pings (answered, as a worker must) unless one
    is asked for."""
    while True:
        msg = Message.from_json(await comm.receive_from(timeout=TIMEOUT))
        if msg.type == "heartbeat" and "ack" not in msg.data:
            await comm.send_to(text_data=Message.heartbeat(ack=msg.msg_id).to_json())
        if kind == msg.type or (kind is None and msg.type != "heartbeat"):
            return msg
        if kind is not None and msg.type not in {kind, "heartbeat"}:
            raise AssertionError(f"expected {kind}, got {msg}")


async def no_request(comm: WebsocketCommunicator, seconds: float) -> bool:
    """True if no ``request`` frame arrives for ``seconds`` (pings are ignored).

    ``receive_nothing`` is used to wait because a timed-out ``receive_from`` would
    cancel the application under test.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if not await comm.receive_nothing(0.05):
            if Message.from_json(await comm.receive_from(TIMEOUT)).type == "request":
                return False
    return True


async def worker(worker_id: str, *commands: str, max_concurrency: int = 4,
                 features: frozenset[Feature] = frozenset()) -> WebsocketCommunicator:
    comm = await open_socket("/ws/worker/")
    reg = Registration(worker_id, worker_id, list(commands or ("echo",)),
                       max_concurrency=max_concurrency, features=features)
    await comm.send_to(text_data=Message("connect", reg.to_data()).to_json())
    ack = await frame(comm, "connect")
    assert ack.data["worker_id"] == worker_id and ack.data["heartbeat_interval"] == 0.2
    return comm


async def requester() -> WebsocketCommunicator:
    return await open_socket("/ws/requester/")


async def ask(comm: WebsocketCommunicator, command: str, request_id: str = "r1",
              **extra: Any) -> None:
    await comm.send_json_to({"request_id": request_id, "command": command, **extra})


async def answer(worker_comm: WebsocketCommunicator, result: Any = None,
                 success: bool = True) -> Message:
    request = await frame(worker_comm, "request")
    await worker_comm.send_to(text_data=Message.response(
        request.msg_id, success, result if result is not None else request.data["params"],
        None if success else "boom").to_json())
    return request


async def test_request_is_forwarded_and_answered_with_processed_by() -> None:
    w, r = await worker("w1"), await requester()
    await ask(r, "echo", data={"message": "hi"})
    request = await answer(w, "Echo: hi")
    # The seed's two fields, and the time left, which a seed worker ignores.
    assert request.data.pop("time_left") == pytest.approx(30, abs=1)
    assert request.data == {"action": "echo", "params": {"message": "hi"}}
    assert await r.receive_json_from(TIMEOUT) == {
        "request_id": "r1", "success": True, "data": "Echo: hi", "error": None,
        "processed_by": "w1"}


async def test_a_malformed_answer_still_ends_its_request_at_once() -> None:
    """A worker's answer with a wrong-typed field: the requester is answered now (not
    at its timeout), the worker told why; a borrowed broker code reads worker_error."""
    w, r = await worker("w1"), await requester()
    await ask(r, "echo", data={"message": "hi"})
    request = await frame(w, "request")
    await w.send_to(text_data=Message("response", {
        "request_id": request.msg_id, "success": False, "error": "x", "code": 123}).to_json())
    reply = await r.receive_json_from(TIMEOUT)
    assert (reply["success"], reply["code"]) == (False, "worker_error")
    assert "Malformed answer" in reply["error"]
    assert (await frame(w, "error")).data["code"] == "bad_request"
    for i, borrowed in enumerate((ErrorCode.BROKER_UNAVAILABLE, ErrorCode.TIMEOUT,
                                  ErrorCode.TOO_LARGE, ErrorCode.WORKER_LOST)):
        await ask(r, "echo", request_id=f"r{i + 2}")
        request = await frame(w, "request")
        await w.send_to(text_data=Message.response(request.msg_id, False, None, "lie",
                                                   borrowed).to_json())
        assert (await r.receive_json_from(TIMEOUT))["code"] == "worker_error"


async def test_a_batch_from_another_process_reaches_its_workers_and_answers_come_back(
        ) -> None:
    """What a second broker process sends: forwards for this process's workers, in one
    layer message. One worker left meanwhile: its request comes back as lost."""
    from channels.layers import get_channel_layer

    from dispatch.core import events
    from dispatch.core.events import Forward, Lost, Reply

    w = await worker("w1")
    dispatcher, layer = await get_dispatcher(), get_channel_layer()
    entry = await dispatcher.registry.get("w1")
    assert entry is not None and entry.inbox == dispatcher.inbox
    other_inbox = await layer.new_channel()
    await layer.send(dispatcher.inbox, events.batch_to_layer([
        Forward("k1", "echo", {"n": 1}, other_inbox, 5.0, "w1", entry.connection),
        Forward("k2", "echo", {"n": 2}, other_inbox, 5.0, "gone", "no-such-connection"),
    ]))
    request = await answer(w, "done")
    assert request.msg_id == "k1"
    got = {}
    for _ in range(2):
        message = await asyncio.wait_for(layer.receive(other_inbox), TIMEOUT)
        got[message["key"]] = message
    assert got["k1"]["type"] == Reply.TYPE and got["k1"]["data"] == "done"
    assert got["k2"]["type"] == Lost.TYPE and got["k2"]["worker_id"] == "gone"


async def test_a_big_request_in_a_batch_counts_its_own_bytes_in_flight() -> None:
    """A batch of one big request and small ones that are answered at once: the
    big one still holds its bytes against MAX_IN_FLIGHT_BYTES (a share of the frame's
    size would let a peer hold many of them almost uncounted)."""
    w1 = await worker("w1", "echo", "slow", max_concurrency=300)
    comm = await requester()
    with override_settings(BROKER={"HISTORY": False, "MAX_IN_FLIGHT_BYTES": 150_000}):
        big = {"request_id": "big", "command": "slow", "data": {"blob": "x" * 100_000}}
        small = [{"request_id": f"s{i}", "command": "echo", "data": {}} for i in range(30)]
        await comm.send_to(text_data=json.dumps([big, *small]))
        for _ in range(31):
            request = await frame(w1, "request")
            if request.data["action"] == "echo":
                await w1.send_to(text_data=Message.response(request.msg_id, True, 1).to_json())
        answered = 0
        while answered < 30:
            got = json.loads(await comm.receive_from(TIMEOUT))
            answered += len(got) if isinstance(got, list) else 1
        await comm.send_to(text_data=json.dumps([{**big, "request_id": "big2"}]))
        refused = json.loads(await comm.receive_from(TIMEOUT))
    refused = refused[0] if isinstance(refused, list) else refused
    assert refused["request_id"] == "big2" and refused["code"] == "limit_exceeded"


async def test_no_worker_answers_at_once() -> None:
    r = await requester()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ask(r, "echo")
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["error"] == "No available workers" and reply["request_id"] == "r1"
    assert loop.time() - started < 0.1


async def test_timeout_answers_and_a_late_answer_is_dropped() -> None:
    w, r = await worker("w1"), await requester()
    await ask(r, "echo", timeout=0.2)
    request = await frame(w, "request")
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["error"] == "Worker response timeout"
    await w.send_to(text_data=Message.response(request.msg_id, True, "late").to_json())
    while not await w.receive_nothing(0.1):  # if the broker no longer held it: an error
        assert Message.from_json(await w.receive_from(TIMEOUT)).type in {"error", "heartbeat"}
    await ask(r, "echo", request_id="r2")
    await answer(w, "fresh")
    assert (await r.receive_json_from(TIMEOUT))["data"] == "fresh"  # not "late"
    assert (await get_dispatcher()).stats["late"] == 1


async def test_worker_lost_mid_request_fails_over_to_another() -> None:
    w1, r = await worker("w1"), await requester()
    await ask(r, "echo", data={"n": 1})
    await frame(w1, "request")
    w2 = await worker("w2")
    await w1.disconnect()
    await answer(w2)
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["success"] and reply["processed_by"] == "w2" and reply["data"] == {"n": 1}


async def test_worker_lost_with_nobody_left_is_an_explicit_error() -> None:
    w1, r = await worker("w1"), await requester()
    await ask(r, "echo")
    await frame(w1, "request")
    await w1.disconnect()
    reply = await r.receive_json_from(TIMEOUT)
    assert not reply["success"] and reply["error"].startswith("Worker lost")


async def test_full_workers_queue_requests_until_a_slot_frees() -> None:
    w, r = await worker("w1", max_concurrency=1), await requester()
    await ask(r, "echo", request_id="a")
    await ask(r, "echo", request_id="b")
    first = await frame(w, "request")
    assert await no_request(w, 0.3)  # b waits: the only slot is taken
    await w.send_to(text_data=Message.response(first.msg_id, True, "A").to_json())
    assert (await r.receive_json_from(TIMEOUT))["request_id"] == "a"
    await answer(w, "B")
    assert (await r.receive_json_from(TIMEOUT))["data"] == "B"


async def test_many_requests_in_flight_are_matched_by_request_id() -> None:
    w, r = await worker("w1", max_concurrency=10), await requester()
    for i in range(5):
        await ask(r, "echo", request_id=f"id{i}", data={"i": i})
    requests = [await frame(w, "request") for _ in range(5)]
    for req in reversed(requests):  # answer in reverse order
        await w.send_to(text_data=Message.response(req.msg_id, True, req.data["params"]).to_json())
    replies = [await r.receive_json_from(TIMEOUT) for _ in range(5)]
    assert [x["request_id"] for x in replies] == [f"id{i}" for i in reversed(range(5))]
    assert all(x["data"] == {"i": int(x["request_id"][2:])} for x in replies)


@pytest.mark.parametrize("text, error", [
    ("{not json", "Malformed JSON"),
    ('["a list"]', "Each frame of a batch must be a JSON object"),  # a batch of one
    ('{"request_id": "x"}', "Missing field 'command'"),
    ('{"request_id": "x", "command": 5}', "Field 'command' must be str"),
    ('{"request_id": "x", "command": "echo", "data": []}', "Field 'data' must be dict"),
    ("x" * 5000, "Message too large"),
])
async def test_bad_requester_frames_get_clear_errors_and_the_socket_stays_up(
        text: str, error: str) -> None:
    w, r = await worker("w1"), await requester()
    await r.send_to(text_data=text)
    reply = await r.receive_json_from(TIMEOUT)
    assert not reply["success"] and error in reply["error"]
    await ask(r, "echo")
    await answer(w, "still fine")
    assert (await r.receive_json_from(TIMEOUT))["data"] == "still fine"


async def test_binary_frame_and_duplicate_request_id_are_refused() -> None:
    w, r = await worker("w1"), await requester()
    await r.send_to(bytes_data=b"\x00\x01")
    assert "Binary frames" in (await r.receive_json_from(TIMEOUT))["error"]
    await ask(r, "echo", request_id="same")
    await ask(r, "echo", request_id="same")
    dup = await r.receive_json_from(TIMEOUT)
    assert "Duplicate request_id" in dup["error"]
    await answer(w, "once")
    assert (await r.receive_json_from(TIMEOUT))["data"] == "once"
    assert await no_request(w, 0.2)


@pytest.mark.parametrize("text, error", [
    ("{oops", "Malformed JSON"),
    ('{"type": "teleport", "data": {}}', "Unknown message type 'teleport'"),
    ('{"type": "response", "data": {"success": true}}', "Missing field 'request_id'"),
    ('{"type": "connect", "data": {}}', "Already registered"),
])
async def test_bad_worker_frames_get_error_frames_and_keep_in_flight_work(
        text: str, error: str) -> None:
    w, r = await worker("w1"), await requester()
    await ask(r, "echo")
    request = await frame(w, "request")
    await w.send_to(text_data=text)
    err = await frame(w, "error")
    assert error in err.data["error"]
    await w.send_to(text_data=Message.response(request.msg_id, True, "ok").to_json())
    assert (await r.receive_json_from(TIMEOUT))["data"] == "ok"


async def test_unregistered_worker_must_register_first_and_bad_registration_closes() -> None:
    comm = await open_socket("/ws/worker/")
    await comm.send_to(text_data=Message.heartbeat().to_json())
    assert "Register first" in (await frame(comm, "error")).data["error"]
    await comm.send_to(text_data=Message("connect", {"commands": "echo"}).to_json())
    assert "Bad registration" in (await frame(comm, "error")).data["error"]
    assert (await comm.receive_output(TIMEOUT))["type"] == "websocket.close"


async def test_schemas_are_kept_for_describe_and_a_bad_one_costs_only_its_description(
        ) -> None:
    from dispatch.control import services

    async def register(worker_id: str, data: dict[str, Any]) -> dict[str, Any]:
        comm = await open_socket("/ws/worker/")
        await comm.send_to(text_data=json.dumps(
            {"type": "connect", "data": {"worker_id": worker_id, **data}}))
        return (await frame(comm, "connect")).data

    resize = {"params": [{"name": "url", "type": "str", "required": True}], "doc": "Resize."}
    other = {"params": [], "doc": "Resize, the old way."}
    assert "schemas_dropped" not in await register("seed", {"commands": ["resize"]})
    for worker_id in ("new1", "new2"):
        await register(worker_id, {"commands": ["resize"], "schemas": {"resize": resize}})
    ack = await register("odd", {"commands": ["resize", "echo"],
                                 "schemas": {"resize": other, "echo": {"params": "x"}}})
    assert ack["schemas_dropped"] == ["schema of 'echo': 'params' must be a list"]
    echo, described = (await services.describe())["commands"]
    echo.pop("stats")  # this process's counts, from every test run in it so far
    assert echo == {"command": "echo", "workers": [{"worker_id": "odd", "name": "odd"}],
                    "count": 1, "schema": None, "schemas_differ": False}
    assert described["command"] == "resize" and described["count"] == 4
    assert [w["worker_id"] for w in described["workers"]] == ["new1", "new2", "odd", "seed"]
    assert described["schema"] == resize and described["schemas_differ"] is True
    assert [{k: v for k, v in c.items() if k != "stats"}
            for c in (await services.describe("echo"))["commands"]] == [echo]
    assert (await services.describe("nothing"))["commands"] == []


async def test_heartbeats_are_answered_and_sent() -> None:
    w = await worker("w1")
    ping = Message.heartbeat(in_flight=0)
    await w.send_to(text_data=ping.to_json())
    assert (await frame(w, "heartbeat")).data.get("ack") == ping.msg_id
    broker_ping = await frame(w, "heartbeat")  # the broker pings every interval (0.2 s)
    assert "ack" not in broker_ping.data


async def frames_within(comm: WebsocketCommunicator, seconds: float) -> list[str]:
    """Every frame (as text) the broker sends in ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline, texts = loop.time() + seconds, []
    while loop.time() < deadline:
        if not await comm.receive_nothing(0.02):
            texts.append(await comm.receive_from(TIMEOUT))
    return texts


async def test_a_quiet_worker_that_beats_is_sent_nothing_while_idle() -> None:
    w = await worker("w1", features=frozenset({Feature.QUIET_HEARTBEAT}))
    heard = []
    for _ in range(8):  # 1.6 s = 8 intervals, a beat each, none asking
        await w.send_to(text_data=Message.heartbeat(in_flight=0).to_json())
        heard += await frames_within(w, 0.2)
    assert heard == []  # no acks, no pings: one frame per interval in all
    asking = Message.heartbeat(in_flight=0, want_ack=True)
    await w.send_to(text_data=asking.to_json())
    assert Message.from_json(await w.receive_from(TIMEOUT)).data["ack"] == asking.msg_id


async def test_a_quiet_worker_that_falls_silent_is_pinged_then_dropped() -> None:
    w = await worker("w1", features=frozenset({Feature.QUIET_HEARTBEAT}))
    ping = Message.from_json(await w.receive_from(TIMEOUT))  # silent 1.5 intervals
    assert ping.type == "heartbeat" and "ack" not in ping.data
    await w.send_to(text_data=Message.heartbeat(ack=ping.msg_id).to_json())
    for _ in range(40):  # answers nothing more: dropped after 3 silent intervals
        out = await w.receive_output(TIMEOUT)
        if out["type"] == "websocket.close":
            assert out["code"] == CloseCode.HEARTBEAT_TIMEOUT
            return
    raise AssertionError("a silent worker was not dropped")


async def test_batch_frames_both_ways() -> None:
    w = await worker("w1", features=frozenset({Feature.BATCH}), max_concurrency=8)
    r = await requester()
    for i in range(6):
        await ask(r, "echo", request_id=f"r{i}", data={"i": i})
    requests: list[dict] = []
    frames_seen = 0
    while len(requests) < 6:
        await w.send_to(text_data=Message.heartbeat().to_json())
        text = await w.receive_from(TIMEOUT)
        got = json.loads(text)
        got = got if isinstance(got, list) else [got]
        frames_seen += 1
        requests += [m for m in got if m["type"] == "request"]
        for m in got:
            if m["type"] == "heartbeat" and "ack" not in m["data"]:
                await w.send_to(text_data=Message.heartbeat(ack=m["msg_id"]).to_json())
    assert frames_seen < 6  # several requests in one frame
    # All six answered in one frame; one envelope in it is malformed (refused alone).
    answers = [Message.response(m["msg_id"], True, m["data"]["params"]).to_json()
               for m in requests]
    await w.send_to(text_data="[" + ",".join(answers + ['{"type": 7}']) + "]")
    got = sorted([(await r.receive_json_from(TIMEOUT))["request_id"] for _ in range(6)])
    assert got == [f"r{i}" for i in range(6)]
    assert "Field 'type'" in (await frame(w, "error")).data["error"]


async def test_batches_are_refused_from_a_worker_that_did_not_ask() -> None:
    w = await worker("w1")
    await w.send_to(text_data="[" + Message.heartbeat().to_json() + "]")
    error = await frame(w, "error")
    assert "Expected a JSON object" in error.data["error"]
    await w.send_to(text_data="[]")  # and an empty batch from one that did
    b = await worker("w2", features=frozenset({Feature.BATCH}))
    await b.send_to(text_data="[]")
    assert "empty array" in (await frame(b, "error")).data["error"]


async def test_silent_worker_is_dropped_and_its_request_fails_over() -> None:
    silent, r = await worker("silent"), await requester()
    await ask(r, "echo")
    await frame(silent, "request")
    alive = await worker("alive")
    # "alive" keeps talking; "silent" says nothing for 3 intervals (0.6 s)
    request = None
    for _ in range(30):
        await alive.send_to(text_data=Message.heartbeat().to_json())
        await asyncio.sleep(0.1)
        while request is None and not await alive.receive_nothing(0.01):
            msg = Message.from_json(await alive.receive_from(TIMEOUT))
            if msg.type == "heartbeat" and "ack" not in msg.data:
                await alive.send_to(text_data=Message.heartbeat(ack=msg.msg_id).to_json())
            request = msg if msg.type == "request" else None
        if request is not None:
            break
    assert request is not None, "request never failed over"
    await alive.send_to(text_data=Message.response(request.msg_id, True, "saved").to_json())
    assert (await r.receive_json_from(TIMEOUT))["processed_by"] == "alive"


async def test_worker_calls_server_actions() -> None:
    w = await worker("w1")
    req = Message.request("calculate", {"a": 10, "b": 20, "op": "+"})
    await w.send_to(text_data=req.to_json())
    resp = await frame(w, "response")
    assert resp.data == {"request_id": req.msg_id, "success": True, "data": 30, "error": None}
    req = Message.request("calculate", {"a": 1, "b": 0, "op": "/"})
    await w.send_to(text_data=req.to_json())
    assert (await frame(w, "response")).data["error"] == "Division by zero"
    req = Message.request("get_client_info")
    await w.send_to(text_data=req.to_json())
    info = (await frame(w, "response")).data["data"]
    assert info["count"] == 1 and info["workers"][0]["worker_id"] == "w1"


async def test_broadcast_reaches_every_worker() -> None:
    from dispatch.control import services

    w1, w2 = await worker("w1"), await worker("w2")
    assert await services.broadcast("maintenance at noon") == 2
    for w in (w1, w2):
        note = await frame(w, "notification")
        assert note.data["message"] == "maintenance at noon"


async def test_send_to_a_chosen_worker() -> None:
    from dispatch.control import services

    w1, w2 = await worker("w1"), await worker("w2")
    task = asyncio.create_task(services.request("get_time", {}, worker_id="w2"))
    request = await answer(w2, "12:00")
    assert request.data["action"] == "get_time"
    assert (await task).processed_by == "w2"
    assert await no_request(w1, 0.2)
    unknown = await services.request("get_time", {}, worker_id="nobody")
    assert unknown.error == "Unknown worker 'nobody'"


async def test_unknown_path_is_refused() -> None:
    comm = WebsocketCommunicator(app, "/nowhere/")
    connected, code = await comm.connect(timeout=TIMEOUT)
    assert not connected and code == 4404


async def test_worker_server_actions_in_a_batch_compute_on_big_integers() -> None:
    """A worker's own request in a batch frame is read as a single one is: its numbers
    beyond 64 bits are numbers (they were passed on as text, and ``calculate`` said
    they were none)."""
    w = await worker("w1", features=frozenset({Feature.BATCH}))
    batch = [Message.request("calculate", {"a": 10 ** 25, "b": 1, "op": "+"}),
             Message.request("calculate", {"a": 5, "b": 1, "op": "+"})]
    await w.send_to(text_data="[" + ",".join(m.to_json() for m in batch) + "]")
    got = {}
    while len(got) < 2:
        resp = await frame(w, "response")
        got[resp.data["request_id"]] = resp.data["data"]
    assert got == {batch[0].msg_id: 10 ** 25 + 1, batch[1].msg_id: 6}


async def test_a_batching_requester_closed_for_its_rate_hears_why_first() -> None:
    """Refusals gathered for a batch frame go out before the close (they were dropped
    with it, and the peer never heard why it was cut off)."""
    with override_settings(BROKER={"HISTORY": False, "RATE_LIMIT": 50}):
        flood = await requester()
        for _ in range(3):
            await flood.send_to(text_data=json.dumps([{"cancel": "nobody"}] * 60))
        errors = []
        while (out := await flood.receive_output(TIMEOUT))["type"] != "websocket.close":
            got = json.loads(out["text"])
            errors += [a["error"] for a in (got if isinstance(got, list) else [got])]
    assert out["code"] == 4008 and errors[-1] == "Rate limit exceeded (50 frames/s)"


async def test_a_request_sent_again_after_its_answer_gets_no_accepted_event() -> None:
    """Sent again with "accepted", a request that failed before it was stored gets its
    kept answer, and no "accepted" event after it (nothing was stored)."""
    comm = await requester()
    for _ in range(2):
        await ask(comm, "nobody-offers-this", "again", accepted=True)
        assert (await comm.receive_json_from(TIMEOUT))["code"] == "no_workers"
    assert await comm.receive_nothing(0.3)


def test_json_dumps_of_frames_is_compact() -> None:
    assert json.loads(Message.heartbeat(ack="x").to_json())["data"] == {"ack": "x"}


async def test_a_flooding_connection_is_closed_and_others_are_unaffected() -> None:
    w, calm = await worker("w1"), await requester()
    with override_settings(BROKER={"HISTORY": False, "RATE_LIMIT": 50}):
        flood = await requester()
        for i in range(150):  # a burst of 100 is allowed, then 50 a second
            await flood.send_to(text_data="{bad")
        replies = []
        while True:
            out = await flood.receive_output(TIMEOUT)
            if out["type"] == "websocket.close":
                break
            replies.append(json.loads(out["text"])["error"])
        assert out["code"] == 4008 and replies[-1] == "Rate limit exceeded (50 frames/s)"
        assert 100 <= len(replies) - 1 < 110  # the burst was answered one by one
        await ask(calm, "echo")
        await answer(w, "calm")
        assert (await calm.receive_json_from(TIMEOUT))["data"] == "calm"


async def test_requests_in_flight_per_connection_are_limited() -> None:
    w, r = await worker("w1"), await requester()
    with override_settings(BROKER={"HISTORY": False, "MAX_IN_FLIGHT": 2}):
        for i in range(3):
            await ask(r, "echo", request_id=f"r{i}")
        refused = await r.receive_json_from(TIMEOUT)
        assert refused["request_id"] == "r2" and "limit 2" in refused["error"]
        await answer(w, "one")
        assert (await r.receive_json_from(TIMEOUT))["data"] == "one"
        await ask(r, "echo", request_id="r3")  # a slot freed up
        await answer(w, "two")
        await answer(w, "three")
        assert {(await r.receive_json_from(TIMEOUT))["data"] for _ in range(2)} == {"two",
                                                                                   "three"}


async def test_worker_that_talks_but_does_not_read_is_dropped() -> None:
    """Heartbeats alone are not enough: a worker must answer pings, or its socket is
    not being read and whatever the broker sends it would pile up in memory."""
    deaf, r = await worker("deaf"), await requester()
    await ask(r, "echo")
    await frame(deaf, "request")
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = None
    while reply is None and loop.time() - started < 5:
        await deaf.send_to(text_data=Message.heartbeat().to_json())  # talks, never acks
        await asyncio.sleep(0.1)
        if not await r.receive_nothing(0.01):
            reply = await r.receive_json_from(TIMEOUT)
    assert reply is not None and reply["error"].startswith("Worker lost")
    assert "not answering pings" in reply["error"]
    assert loop.time() - started < 2  # 3 intervals of 0.2 s plus one, not the timeout


async def test_a_bug_met_on_a_worker_socket_ends_it_and_what_it_held_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever ends a connection, its worker leaves the registry then, and its request
    goes elsewhere: not after its heartbeats are missed (15 s of requests swallowed)."""
    from dispatch.registry import get_registry
    from dispatch.transport.workers import WorkerConsumer

    async def bug(self: Any, link: Any, msg: Message) -> None:
        raise RuntimeError("a bug reached by a peer's frame")

    monkeypatch.setitem(WorkerConsumer.FRAME_HANDLERS, "request", bug)
    w1, r = await worker("w1"), await requester()
    await ask(r, "echo", data={"n": 1})
    await frame(w1, "request")
    w2 = await worker("w2")
    await w1.send_to(text_data=Message.request("get_time").to_json())
    with pytest.raises(RuntimeError, match="a bug reached"):
        await asyncio.wait_for(w1.future, TIMEOUT)  # the socket's application ends
    assert [w.worker_id for w in await get_registry().all()] == ["w2"]
    await answer(w2)  # its request went to the other worker at once
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["success"] and reply["processed_by"] == "w2"


async def test_attach_is_one_watcher_per_connection_gone_with_it_and_bounded() -> None:
    """5,000 attaches on one connection made each event 5,000 frames, and the watchers
    of closed connections were never dropped."""
    w1, sender = await worker("w1"), await requester()
    await ask(sender, "echo", stream=True)
    job = await frame(w1, "request")
    attacker = await requester()
    for _ in range(50):
        await attacker.send_json_to({"attach": "r1", "stream": True})
    leaving = await requester()
    await leaving.send_json_to({"attach": "r1"})
    table = (await get_dispatcher()).table
    [request] = table.find("anonymous", "r1")
    await asyncio.sleep(0.2)
    assert len(request.watchers) == 3  # the sender, the attacker once, the one leaving
    await leaving.disconnect()
    await asyncio.sleep(0.1)
    assert len(request.watchers) == 2
    await w1.send_to(text_data=Message.progress(job.msg_id, 0.5, "half").to_json())
    assert (await attacker.receive_json_from(TIMEOUT))["event"] == "progress"
    assert await attacker.receive_nothing(0.3)  # one frame, not fifty
    await ask(sender, "echo", "r2")
    await frame(w1, "request")
    with override_settings(BROKER={"HISTORY": False, "MAX_IN_FLIGHT": 1}):
        await attacker.send_json_to({"attach": "r2"})  # a second one: over the bound
        refused = await attacker.receive_json_from(TIMEOUT)
    assert refused["code"] == "limit_exceeded" and refused["request_id"] == "r2"


async def test_a_process_handing_its_work_over_turns_requests_and_workers_away() -> None:
    """While a stopping process hands its requests over (SIGTERM with the job store), a
    request or a connection that comes is told to come back (4000), not refused with
    shutting_down (a failed job: 4-6 of 300 in a rolling restart), and a worker is not
    registered only to be sent away again."""
    r = await requester()
    dispatcher = await get_dispatcher()
    dispatcher.handing_over = True
    await ask(r, "echo")
    assert (await r.receive_output(TIMEOUT))["code"] == CloseCode.SHUTTING_DOWN  # no answer
    late = await open_socket("/ws/requester/")
    assert (await late.receive_output(TIMEOUT))["code"] == CloseCode.SHUTTING_DOWN
    w = await open_socket("/ws/worker/")
    assert (await w.receive_output(TIMEOUT))["code"] == CloseCode.SHUTTING_DOWN
    dispatcher.handing_over = False


async def test_a_key_capped_at_a_priority_is_served_at_it() -> None:
    """Any key could send priority 9 and starve the others' requests: a requester key
    with --max-priority 0 is served at 0, behind another's priority 5."""
    from channels.db import database_sync_to_async

    from dispatch.auth import create_credential, get_guard

    make = database_sync_to_async(create_credential)
    _, fleet = await make("fleet", "worker")
    _, capped = await make("bulk", "requester", max_priority=0)
    _, other = await make("app", "requester")
    await (await get_guard()).refresh()

    def bearer(token: str) -> list[tuple[bytes, bytes]]:
        return [(b"authorization", f"Bearer {token}".encode())]

    w = await open_socket("/ws/worker/", headers=bearer(fleet))
    await w.send_to(text_data=Message("connect", Registration(
        "w1", "w1", ["echo"], max_concurrency=1).to_data()).to_json())
    await frame(w, "connect")
    bulk, app = (await open_socket("/ws/requester/", headers=bearer(capped)),
                 await open_socket("/ws/requester/", headers=bearer(other)))
    await ask(bulk, "echo", "busy")  # takes the one slot
    first = await frame(w, "request")
    await ask(bulk, "echo", "urgent?", priority=9)
    await asyncio.sleep(0.05)
    await ask(app, "echo", "normal", priority=5)
    await asyncio.sleep(0.05)
    await w.send_to(text_data=Message.response(first.msg_id, True, "done").to_json())
    assert (await bulk.receive_json_from(TIMEOUT))["request_id"] == "busy"
    served = await frame(w, "request")
    await w.send_to(text_data=Message.response(served.msg_id, True, "second").to_json())
    answer = await app.receive_json_from(TIMEOUT)  # 5 before a capped 9
    assert (answer["request_id"], answer["data"]) == ("normal", "second")


def test_a_batch_element_counts_its_own_size_even_with_an_integer_orjson_cannot_write(
        ) -> None:
    """-9999999999999999999 is below int64: orjson cannot write it back, and the element
    counted the whole frame's size (refused limit_exceeded) instead of its own."""
    from dispatch.transport.requesters import _size

    small = {"request_id": "a", "command": "echo", "data": {}, "note": -9999999999999999999}
    assert _size(small) < 1000  # its own few hundred bytes parsed
    assert _size({**small, "data": {"blob": "x" * 5000}}) > 5000
