"""The wire formats, without sockets: what goes in as text comes out as data."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers import protocol
from workers.protocol import (ApiRequest, ApiResponse, Message, MessageType, ProtocolError,
                              Registration, RequestBody, ResponseBody)

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- envelope


def test_envelope_has_the_seed_fields_and_round_trips() -> None:
    msg = Message.request("calculate", {"a": 10, "b": 20, "op": "+"})
    frame = json.loads(msg.to_json())
    assert set(frame) == {"type", "msg_id", "timestamp", "data"}
    assert frame["type"] == "request"
    assert frame["data"] == {"action": "calculate", "params": {"a": 10, "b": 20, "op": "+"}}
    assert Message.from_json(msg.to_json()) == msg


def test_seed_example_frame_parses() -> None:
    text = ('{"type": "request", "msg_id": "msg_1234567890", "timestamp": 1234567890.123,'
            ' "data": {"action": "get_time", "params": {}}}')
    msg = Message.from_json(text)
    assert (msg.type, msg.msg_id, msg.timestamp) == ("request", "msg_1234567890", 1234567890.123)
    assert RequestBody.from_message(msg) == RequestBody("get_time", {})


def test_missing_optional_fields_are_filled_in() -> None:
    msg = Message.from_json('{"type": "custom"}')
    assert msg.data == {} and msg.msg_id and msg.timestamp > 0


def test_non_ascii_text_survives() -> None:
    msg = Message.notification("你好，世界")
    assert Message.from_json(msg.to_json()).data["message"] == "你好，世界"


@pytest.mark.parametrize("text, reason", [
    ("not json", "Malformed JSON"),
    ("[1, 2]", "Expected a JSON object, got list"),
    ('{"data": {}}', "Missing field 'type'"),
    ('{"type": ""}', "must not be empty"),
    ('{"type": 5}', "Field 'type' must be str"),
    ('{"type": "x", "data": [1]}', "Field 'data' must be dict"),
    ('{"type": "x", "timestamp": true}', "Field 'timestamp' must be"),
    (b"\xff\xfe", "Malformed JSON"),
])
def test_bad_frames_are_refused_with_a_readable_reason(text: str | bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        Message.from_json(text)


def test_message_types_are_the_seeds_and_the_long_jobs_ones() -> None:
    assert {t.value for t in MessageType} == {
        "connect", "disconnect", "heartbeat", "error", "request", "response", "notification",
        "custom", "cancel", "progress", "chunk", "chunk_ack", "adopt"}


def test_response_and_error_constructors() -> None:
    resp = Message.response("r1", False, None, "boom")
    assert resp.data == {"request_id": "r1", "success": False, "data": None, "error": "boom"}
    assert ResponseBody.from_message(resp) == ResponseBody("r1", False, None, "boom")
    err = Message.error("Unknown message type 'x'", reply_to="m1")
    assert err.type == "error" and err.data == {"error": "Unknown message type 'x'",
                                                "reply_to": "m1"}


def test_heartbeat_ping_and_its_answer() -> None:
    ping = Message.heartbeat(in_flight=3)
    assert ping.data == {"in_flight": 3}
    pong = Message.heartbeat(ack=ping.msg_id, in_flight=0)
    assert pong.data == {"ack": ping.msg_id, "in_flight": 0}


def test_request_body_errors_keep_the_request_id() -> None:
    msg = Message("request", {"params": {}}, msg_id="abc")
    with pytest.raises(ProtocolError) as info:
        RequestBody.from_message(msg)
    assert info.value.request_id == "abc"
    with pytest.raises(ProtocolError, match="'params' must be dict"):
        RequestBody.from_message(Message("request", {"action": "x", "params": [1]}))


# --------------------------------------------------------------------------- registration


def test_registration_round_trip() -> None:
    reg = Registration("w1", "host-1", ["echo", "get_time", "pay"], 2.5, 4, ["pay"])
    assert reg.to_data() == {"worker_id": "w1", "name": "host-1",
                             "commands": ["echo", "get_time", "pay"], "weight": 2.5,
                             "max_concurrency": 4, "no_retry": ["pay"]}
    assert Registration.from_data(reg.to_data()) == reg


def test_a_registration_carries_labels_version_and_hedged_commands() -> None:
    reg = Registration("w1", "g", ["train", "lookup"], labels={"gpu": "a100"},
                       version="2.1", hedge=["lookup"])
    assert Registration.from_data(reg.to_data()) == reg
    assert reg.to_data()["labels"] == {"gpu": "a100"}


def test_registration_defaults() -> None:
    reg = Registration.from_data({"commands": []})
    assert reg.worker_id and reg.name == reg.worker_id
    assert (reg.weight, reg.max_concurrency) == (1.0, 16)


@pytest.mark.parametrize("data, reason", [
    ({}, "Missing field 'commands'"),
    ({"commands": ["ok", ""]}, "list of non-empty strings"),
    ({"commands": [], "weight": 0}, "greater than 0"),
    ({"commands": [], "weight": True}, "'weight' must be"),
    ({"commands": [], "max_concurrency": 0}, "at least 1"),
    ({"commands": [], "max_concurrency": 1.5}, "'max_concurrency' must be int"),
    ({"commands": [], "labels": {"gpu": "a100\x1b[2J"}}, "printable strings"),
    ({"commands": [], "labels": {"": "x"}}, "'labels' must map"),
    ({"commands": [], "labels": {f"k{i}": "v" for i in range(33)}}, "up to 32"),
    ({"commands": [], "labels": ["gpu"]}, "'labels' must map"),
    ({"commands": [], "version": "2.1\n"}, "'version' must be printable"),
])
def test_bad_registrations_are_refused(data: dict, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        Registration.from_data(data)


RESIZE = {"params": [{"name": "url", "type": "str", "required": True},
                     {"name": "width", "type": "int", "required": False, "default": 640}],
          "returns": "dict", "doc": "Resize an image."}


def test_a_registration_may_carry_schemas_and_need_not() -> None:
    reg = Registration("w1", "g", ["resize", "echo"], schemas={"resize": RESIZE})
    assert reg.to_data()["schemas"] == {"resize": RESIZE}
    assert Registration.from_data(reg.to_data()) == reg
    seed = Registration.from_data({"commands": ["echo"]})  # a worker of the seed's
    assert (seed.schemas, seed.schemas_dropped) == ({}, [])
    assert "schemas" not in seed.to_data()


def test_schemas_keep_only_the_keys_this_version_knows() -> None:
    newer = {**RESIZE, "examples": [{"url": "x"}], "extra": False, "stream": True,
             "params": [{**RESIZE["params"][0], "choices": ["a"]}]}
    reg = Registration.from_data({"commands": ["resize"], "schemas": {"resize": newer}})
    assert reg.schemas == {"resize": {
        "params": [{"name": "url", "type": "str", "required": True}],
        "returns": "dict", "doc": "Resize an image.", "stream": True}}
    assert reg.schemas_dropped == []


def test_a_schemas_field_that_is_no_object_is_refused_like_any_wrong_field() -> None:
    with pytest.raises(ProtocolError, match="Field 'schemas' must be dict, got list"):
        Registration.from_data({"commands": ["resize"], "schemas": [RESIZE]})


def test_oversized_schemas_are_dropped_and_the_worker_still_registers() -> None:
    docs = {f"c{i}": {**RESIZE, "doc": "d" * 190} for i in range(100)}
    reg = Registration.from_data({"commands": list(docs), "schemas": docs})
    assert reg.commands == list(docs) and reg.schemas == {}
    [reason] = reg.schemas_dropped
    assert reason.startswith("Field 'schemas' is ") and "limit 16384" in reason


@pytest.mark.parametrize("schema, reason", [
    ("resize", "must be an object, got str"),
    ({"doc": "no params"}, "'params' must be a list"),
    ({**RESIZE, "doc": "bell\x07"}, "'doc' must be printable text of at most 200"),
    ({**RESIZE, "doc": "d" * 201}, "'doc' must be printable text"),
    ({**RESIZE, "stream": "yes"}, "'stream' must be true or false"),
    ({"params": [{"name": f"p{i}", "required": True} for i in range(65)]},
     "lists 65 parameters (limit 64)"),
    ({"params": ["url"]}, "parameter 1 must be an object"),
    ({"params": [{"type": "str", "required": True}]}, "parameter 1 must have a 'name'"),
    ({"params": [{"name": "url\u2028", "required": True}]}, "parameter 1: 'name' must be"),
    ({"params": [{"name": "url", "type": "\x1b[2J", "required": True}]},
     "parameter 'url': 'type' must be printable"),
    ({"params": [{"name": "url"}]}, "'required' must be true or false"),
    ({"params": [{"name": "url", "required": True, "default": 1}]},
     "is required, yet has a default"),
    ({"params": [{"name": "url", "required": False, "default": 1, "default_repr": "1"}]},
     "has both 'default' and 'default_repr'"),
    ({"params": [{"name": "url", "required": False, "default": "x" * 199}]},
     "'default' is 201 characters of JSON"),
    ({"params": [{"name": "w", "required": False, "default": float("inf")}]},
     "'default' is not plain JSON"),
    ({"params": [{"name": "w", "required": True}, {"name": "w", "required": True}]},
     "lists a parameter twice"),
])
def test_a_bad_schema_costs_its_command_its_description_only(schema: object,
                                                             reason: str) -> None:
    reg = Registration.from_data({"commands": ["resize", "echo"],
                                  "schemas": {"resize": schema, "echo": {"params": []}}})
    assert reg.commands == ["resize", "echo"] and reg.schemas == {"echo": {"params": []}}
    [dropped] = reg.schemas_dropped
    assert dropped.startswith("schema of 'resize': ") and reason in dropped


def test_schemas_of_commands_not_offered_are_dropped_and_reasons_are_few() -> None:
    schemas = {f"ghost{i}\x1b": RESIZE for i in range(20)}
    reg = Registration.from_data({"commands": ["resize"], "schemas": schemas})
    assert reg.schemas == {} and len(reg.schemas_dropped) == protocol.MAX_SCHEMA_REASONS
    assert reg.schemas_dropped[0] == "schema of 'ghost0\\x1b': not a command of this worker"
    assert reg.schemas_dropped[-1] == "and 11 more"


def test_an_overflowed_number_in_a_frame_is_no_default() -> None:
    """1e400 with 19 digits before it reaches the stdlib parser, which makes it inf."""
    text = ('{"type": "connect", "data": {"commands": ["w"], "schemas": {"w": {"params": '
            '[{"name": "x", "required": false, "default": 1' + "0" * 19 + 'e400}]}}}}')
    reg = Registration.from_data(Message.from_json(text).data)
    assert reg.schemas == {} and "not plain JSON" in reg.schemas_dropped[0]


# --------------------------------------------------------------------------- requester API


def test_api_request_as_in_the_seed() -> None:
    req = ApiRequest.from_json('{"request_id": "u1", "command": "echo", '
                               '"data": {"message": "Hello World"}}')
    assert req == ApiRequest("echo", {"message": "Hello World"}, "u1", None)
    assert json.loads(req.to_json()) == {"request_id": "u1", "command": "echo",
                                         "data": {"message": "Hello World"}}


def test_api_request_gets_an_id_and_keeps_a_timeout() -> None:
    req = ApiRequest.from_json('{"command": "get_time", "timeout": 2}')
    assert req.request_id and req.data == {} and req.timeout == 2.0
    assert json.loads(req.to_json())["timeout"] == 2.0


@pytest.mark.parametrize("text, reason, rid", [
    ('{"request_id": "u1"}', "Missing field 'command'", "u1"),
    ('{"request_id": "u1", "command": ""}', "must not be empty", "u1"),
    ('{"request_id": 7, "command": "x"}', "'request_id' must be str", None),
    ('{"request_id": "u1", "command": "x", "data": "hi"}', "'data' must be dict", "u1"),
    ('{"request_id": "u1", "command": "x", "timeout": 0}', "between 0 and 2592000", "u1"),
    ('{"request_id": "u1", "command": "x", "timeout": "5"}', "'timeout' must be", "u1"),
])
def test_bad_api_requests_say_why_and_keep_the_id(text: str, reason: str, rid: str | None
                                                  ) -> None:
    with pytest.raises(ProtocolError, match=reason) as info:
        ApiRequest.from_json(text)
    assert info.value.request_id == rid


def test_api_response_round_trip_and_failure() -> None:
    resp = ApiResponse("u1", True, "2025-10-20 15:30:45", None, "abc123")
    assert json.loads(resp.to_json()) == {"request_id": "u1", "success": True,
                                          "data": "2025-10-20 15:30:45", "error": None,
                                          "processed_by": "abc123"}
    assert ApiResponse.from_json(resp.to_json()) == resp
    fail = ApiResponse.failure(None, protocol.NO_WORKERS, protocol.ErrorCode.NO_WORKERS)
    assert json.loads(fail.to_json()) == {  # the seed's five fields, and the code beside
        "request_id": None, "success": False, "data": None, "error": "No available workers",
        "processed_by": None, "code": "no_workers"}
    assert ApiResponse.from_json(fail.to_json()) == ApiResponse(
        None, False, None, "No available workers", None, "no_workers")


def test_every_error_code_has_its_exception_class() -> None:
    from workers import errors

    for code in protocol.ErrorCode:
        raised = errors.RequestFailed.from_answer("x", code.value)
        assert type(raised) is not errors.RequestFailed, code
        assert raised.code == code.value and raised.error == "x"
    assert type(errors.RequestFailed.from_answer("x", None)) is errors.RequestFailed
    assert type(errors.RequestFailed.from_answer("x", "from-the-future")) is \
        errors.RequestFailed
    assert isinstance(errors.RequestFailed.from_answer("x", "no_workers"), errors.NoWorkers)


def test_seed_error_texts() -> None:
    assert protocol.NO_WORKERS == "No available workers"
    assert protocol.TIMEOUT == "Worker response timeout"


def test_big_integers_serialize_like_stdlib_json() -> None:
    """orjson stops at 64 bits; the answer must not depend on whether it is installed."""
    big = 2**70
    assert json.loads(protocol.dumps({"v": big})) == {"v": big}
    with pytest.raises(TypeError):
        protocol.dumps({"v": object()})


def test_worker_side_imports_no_django() -> None:
    """A worker machine installs only websockets: the workers package must stay Django-free."""
    code = ("import sys, workers.client, workers.requester, workers.__main__, workers.builtin\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('django', 'channels', 'dispatch', 'brokersite', 'daphne'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("worker_id", ["w1\u200b", "w 1", "\uff11abc", "w1\x00", "ü"])
def test_worker_ids_that_could_pass_for_others_are_refused(worker_id: str) -> None:
    with pytest.raises(ProtocolError, match="may hold only letters, digits"):
        Registration.from_data({"worker_id": worker_id, "commands": ["echo"]})
    assert Registration.from_data({"worker_id": "gpu-1.eu:a@b_c", "commands": ["x"]})


@pytest.mark.parametrize("bad", ["\x1b[31mred", "c1\u009b2J", "rtl\u202eevil", "line\nbreak"])
def test_names_that_could_take_over_a_terminal_are_refused(bad: str) -> None:
    with pytest.raises(ProtocolError, match="printable"):
        Registration.from_data({"worker_id": "w1", "name": bad, "commands": ["echo"]})
    with pytest.raises(ProtocolError, match="printable"):
        Registration.from_data({"worker_id": "w1", "commands": ["echo", bad]})
    with pytest.raises(ProtocolError, match="printable"):
        ApiRequest.from_dict({"command": bad})
    assert Registration.from_data({"worker_id": "w1", "name": "GPU box 1",
                                   "commands": ["ok name"]}).name == "GPU box 1"


# --------------------------------------------------------------------------- features, batches


def test_features_are_parsed_and_unknown_ones_ignored() -> None:
    data = Registration("w", "w", ["echo"], features=frozenset(protocol.Feature)).to_data()
    assert data["features"] == ["batch", "quiet_heartbeat", "resume"]
    data["features"] = ["batch", "teleport", 7]
    assert Registration.from_data(data).features == {protocol.Feature.BATCH}
    data["features"] = "batch"
    with pytest.raises(ProtocolError, match="features"):
        Registration.from_data(data)
    assert "features" not in Registration("w", "w", ["echo"]).to_data()  # a seed worker


def test_a_worker_that_comes_back_lists_the_jobs_it_holds() -> None:
    data = Registration("w", "w", ["echo"], jobs=["k1", "k2"]).to_data()
    assert data["jobs"] == ["k1", "k2"] and Registration.from_data(data).jobs == ["k1", "k2"]
    assert "jobs" not in Registration("w", "w", ["echo"]).to_data()
    for bad in ("k1", ["k1", 7], [""], ["x" * 200], ["k"] * (protocol.MAX_JOBS + 1)):
        with pytest.raises(ProtocolError, match="jobs"):
            Registration.from_data({**data, "jobs": bad})


def test_batch_frames_keep_order_and_size() -> None:
    texts = [json.dumps({"type": "x", "n": i}) for i in range(10)]
    frames = list(protocol.batch_frames(texts, limit=60))
    assert all(len(f) <= 60 or not f.startswith("[") for f in frames) and len(frames) > 1
    flat = [m for f in frames for m in protocol.loads_frames(f)]
    assert [m["n"] for m in flat] == list(range(10))
    assert list(protocol.batch_frames(["x" * 100], limit=60)) == ["x" * 100]  # alone
    with pytest.raises(ProtocolError, match="at most"):
        protocol.loads_frames(json.dumps([{}] * (protocol.MAX_BATCH + 1)))


def test_a_bad_envelope_of_a_batch_is_an_error_of_its_own() -> None:
    good = Message.heartbeat().to_json()
    frames = protocol.loads_frames(f'[{good}, 7, {{"type": 7}}, {good}]')
    parsed = list(protocol.batch_messages(frames))
    assert [type(p).__name__ for p in parsed] == ["Message", "ProtocolError", "ProtocolError",
                                                   "Message"]
    assert "must be a JSON object" in str(parsed[1]) and "Field 'type'" in str(parsed[2])


def test_disconnect_says_when_to_come_back() -> None:
    from workers.session import Leave, react

    def leave(data: dict) -> Leave:
        reaction = react(Message("disconnect", data), stopping=False, handled=set())
        assert isinstance(reaction, Leave)
        return reaction

    assert leave({"reason": "bye", "retry_after": 3.5}).retry_after == 3.5
    assert leave({"reason": "bye", "retry_after": 1e9}).retry_after == 120.0  # capped
    assert leave({"reason": "bye", "retry_after": "soon"}).retry_after is None
    assert leave({"reason": "bye"}).retry_after is None


def test_peek_reads_an_id_near_the_start_of_a_frame_too_large_to_parse() -> None:
    from workers.protocol import peek

    big = '{"request_id": "r\\"1", "command": "echo", "data": {"x": "' + "y" * 5_000_000 + '"}}'
    assert peek(big, "request_id") == 'r"1' and peek(big, "command") == "echo"
    late = '{"data": "' + "y" * 10_000 + '", "request_id": "r2"}'
    assert peek(late, "request_id") is None  # not searched for beyond the start
    assert peek('{"request_id": 7}', "request_id") is None


def test_a_relay_keeps_integers_beyond_64_bits_as_they_came() -> None:
    """The broker passes huge integers on: converting 4,300 digits to an int and back
    costs quadratic time, so it keeps their text (and writes it back with orjson)."""
    import orjson

    from workers.protocol import dumps_fast, loads_object, relayed

    text = '{"n":[' + ",".join(["9" * 4300] * 230 + ["12345678901234567890123", "-5"]) + "]}"
    kept = relayed(loads_object, text)
    assert isinstance(kept["n"][0], orjson.Fragment) and kept["n"][-1] == -5
    assert dumps_fast(kept) == text  # written back exactly, by orjson
    exact = loads_object(text)  # a worker computes on them: real integers
    assert exact["n"][-2] == 12345678901234567890123 and exact["n"][-1] == -5
    for parse in (loads_object, functools.partial(relayed, loads_object)):  # as documented
        with pytest.raises(ProtocolError, match="Malformed JSON"):
            parse('{"n": ' + "9" * 4301 + "}")
    with pytest.raises(ProtocolError, match="must be str, got int$"):  # kept, and an int
        relayed(Message.from_json, '{"type": 10000000000000000000}')


def test_ids_are_unique_and_do_not_count() -> None:
    """A worker sees the ids of the requests it serves: a counter told it how many
    requests the broker handled for others in between."""
    from workers.protocol import new_id

    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    gaps = {int(b[27:], 16) - int(a[27:], 16) for a, b in zip(ids, ids[1:])}
    assert len(gaps) > 9_000  # consecutive ids: no constant step (it was 1)
    assert [i[:11] for i in ids] == sorted(i[:11] for i in ids)  # time first: the index
