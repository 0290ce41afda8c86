"""Hostile input, generated: the protocol parser and both sockets under Hypothesis.

Two layers. The parser (``workers.protocol``) must turn any text, bytes or JSON
value into either a valid object or a :class:`ProtocolError` (never any other
exception), and what it serializes must parse back to the same object. The
sockets, driven in-process through Channels' ``WebsocketCommunicator``, must answer
every frame exactly once and stay usable: on the requester socket with an error or
the normal answer, on the worker socket with an ``error`` frame, while a request in
flight on that worker is still answered afterwards.

The figures in ``max_examples`` keep the whole file under 20 seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
from typing import Any, AsyncIterator, Callable

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatch import registry as registry_module
from dispatch.control.actions import message_handlers
from dispatch.auth import stop_guard
from dispatch.core.dispatcher import stop_dispatcher
from dispatch.transport.routing import SocketRouter
from workers import protocol
from workers.protocol.fields import MAX_PROTOCOL_TIMEOUT
from workers.protocol import (ApiRequest, ApiResponse, Message, MessageType, ProtocolError,
                              Registration, RequestBody, ResponseBody)

TIMEOUT = 3
REPLY_WAIT = 1.0  # an answer takes milliseconds; short, so a failing example shrinks fast
LIMIT = 4096  # MAX_MESSAGE_BYTES in these tests: "huge" frames are cheap to make

#: CI draws the same examples each run (a red CI must mean a change broke something);
#: a contributor's run draws new ones, and keeps what fails in .hypothesis/.
FUZZ = settings(deadline=None, max_examples=60,
                derandomize=os.environ.get("REQUIRE_SERVICES") == "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SOCKET_FUZZ = settings(FUZZ, max_examples=50)

# ---------------------------------------------------------------------------- strategies

#: Text a real socket can carry: daphne hands the application valid UTF-8 only
#: (Autobahn section 6 checks that), so no lone surrogates.
wire_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
#: Integers orjson parses back as integers; beyond them the stdlib parser takes over
#: (see the tests of integers beyond 64 bits below).
ints64 = st.integers(min_value=-2**63, max_value=2**64 - 1)
scalars = (st.none() | st.booleans() | ints64
           | st.floats(allow_nan=False, allow_infinity=False) | wire_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(wire_text, inner, max_size=4),
    max_leaves=12)
json_objects = st.dictionaries(wire_text, json_values, max_size=4)

FIELD_NAMES = ["type", "msg_id", "timestamp", "data", "request_id", "command", "timeout",
               "success", "error", "processed_by", "action", "params", "worker_id", "name",
               "commands", "weight", "max_concurrency", "no_retry"]
TYPES = [t.value for t in MessageType] + ["teleport", ""]
#: Values that sit on the edges of what the fields accept.
edgy = st.sampled_from([0, -1, 1, 0.0, 1e-300, 86400, 86400.5, 1e308, -1e308, 2**63 - 1,
                        "", "0", "echo", True, False, None, [], {}, [""], ["echo"],
                        ["echo", 1], {"a": 1}, *TYPES])
field_values = edgy | json_values
near_objects = st.dictionaries(st.sampled_from(FIELD_NAMES) | wire_text, field_values,
                               max_size=7)
envelopes = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(TYPES) | field_values, "msg_id": wire_text | field_values,
    "timestamp": st.floats(allow_nan=False, allow_infinity=False) | field_values,
    "data": near_objects | field_values})
api_requests = st.fixed_dictionaries({}, optional={
    "request_id": wire_text | field_values,
    "command": st.sampled_from(["echo", "nobody_offers_this"]) | field_values,
    "data": json_objects | field_values, "timeout": field_values})


def dumps(value: Any) -> str:
    return protocol.dumps(value)


json_texts = st.one_of(json_values, near_objects, envelopes, api_requests).map(dumps)
#: Valid-ish JSON cut short or with a byte knocked out: almost, but not quite, JSON.
damaged = json_texts.flatmap(lambda s: st.integers(0, max(len(s) - 1, 0)).flatmap(
    lambda i: st.sampled_from([s[:i], s[:i] + s[i + 1:], s[:i] + "\x00" + s[i:]])))
deep = st.integers(1, 3000).flatmap(lambda n: st.sampled_from(
    ["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n]))
raw_texts = st.one_of(st.text(max_size=50), json_texts, damaged, deep)
raw_inputs = raw_texts | raw_texts.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary()


# ---------------------------------------------------------------------------- parser


def check_message(m: Message) -> None:
    assert isinstance(m.type, str) and m.type
    assert isinstance(m.data, dict)
    assert isinstance(m.msg_id, str) and m.msg_id
    assert isinstance(m.timestamp, float) and math.isfinite(m.timestamp)
    assert Message.from_json(m.to_json()) == m


def check_api_request(r: ApiRequest) -> None:
    assert isinstance(r.command, str) and r.command
    assert isinstance(r.data, dict)
    assert isinstance(r.request_id, str) and r.request_id
    assert r.timeout is None or (isinstance(r.timeout, float)
                                 and 0 < r.timeout <= MAX_PROTOCOL_TIMEOUT)
    assert ApiRequest.from_json(r.to_json()) == r


def check_api_response(r: ApiResponse) -> None:
    assert r.request_id is None or isinstance(r.request_id, str)
    assert isinstance(r.success, bool)
    assert r.error is None or isinstance(r.error, str)
    assert r.processed_by is None or isinstance(r.processed_by, str)
    assert ApiResponse.from_json(r.to_json()) == r


def check_registration(reg: Registration) -> None:
    # An empty list is accepted: such a worker only hears broadcasts.
    assert all(isinstance(c, str) and c for c in reg.commands)
    assert isinstance(reg.weight, float) and reg.weight > 0
    assert type(reg.max_concurrency) is int and reg.max_concurrency >= 1
    assert isinstance(reg.worker_id, str) and reg.worker_id
    assert isinstance(reg.name, str) and reg.name
    assert all(isinstance(c, str) for c in reg.no_retry)
    assert Registration.from_data(reg.to_data()) == reg
    wire = Message.from_json(Message("connect", reg.to_data()).to_json())
    assert Registration.from_data(wire.data) == reg


def check_request_body(body: RequestBody) -> None:
    assert isinstance(body.action, str) and body.action and isinstance(body.params, dict)
    again = Message.from_json(Message.request(body.action, body.params).to_json())
    assert RequestBody.from_message(again) == body


def check_response_body(body: ResponseBody) -> None:
    assert isinstance(body.request_id, str) and isinstance(body.success, bool)
    assert body.error is None or isinstance(body.error, str)
    again = Message.from_json(Message.response(body.request_id, body.success, body.data,
                                               body.error).to_json())
    assert ResponseBody.from_message(again) == body


def parse_as_data(raw: str | bytes) -> dict[str, Any]:
    """The ``data`` of an envelope, as the broker hands it to the body parsers."""
    return Message.from_json(raw).data


#: name -> (parse raw text/bytes, check what it returned)
PARSERS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], None]]] = {
    "Message.from_json": (Message.from_json, check_message),
    "ApiRequest.from_json": (ApiRequest.from_json, check_api_request),
    "ApiResponse.from_json": (ApiResponse.from_json, check_api_response),
    "Registration.from_data": (lambda raw: Registration.from_data(parse_as_data(raw)),
                               check_registration),
    "RequestBody.from_message": (lambda raw: RequestBody.from_message(Message.from_json(raw)),
                                 check_request_body),
    "ResponseBody.from_message": (lambda raw: ResponseBody.from_message(
        Message.from_json(raw)), check_response_body),
}


def outcome(parse: Callable[[Any], Any], raw: Any) -> Any:
    """What ``parse`` made of ``raw``; a ProtocolError is a fine answer, anything else fails."""
    try:
        return parse(raw)
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what was wrong"
        return None


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(raw=raw_inputs)
@example(raw=b"\xff\xfe")
@example(raw='{"type": "x", "timestamp": 1e400}')
@example(raw='{"type": "x", "timestamp": 100000000000000000000000000000000000000000}')
@example(raw='{"type": "connect", "data": {"commands": ["a"], "weight": 1e400}}')
@example(raw='{"command": "x", "timeout": NaN}')
@example(raw="[" * 5000)
def test_parsers_return_a_valid_object_or_raise_protocol_error(name: str, raw: Any) -> None:
    parse, check = PARSERS[name]
    result = outcome(parse, raw)
    if result is not None:
        check(result)


BODY_PARSERS: dict[str, tuple[Callable[[dict[str, Any]], Any], Callable[[Any], None]]] = {
    "Message.from_dict": (Message.from_dict, check_message),
    "Registration.from_data": (Registration.from_data, check_registration),
    "RequestBody.from_message": (lambda d: RequestBody.from_message(Message("request", d)),
                                 check_request_body),
    "ResponseBody.from_message": (lambda d: ResponseBody.from_message(Message("response", d)),
                                  check_response_body),
}


@pytest.mark.parametrize("name", BODY_PARSERS)
@FUZZ
@given(obj=near_objects | envelopes | api_requests)
def test_object_parsers_take_any_json_object(name: str, obj: dict[str, Any]) -> None:
    """The parsers behind the text ones, fed parsed JSON objects directly."""
    parse, check = BODY_PARSERS[name]
    result = outcome(parse, obj)
    if result is not None:
        check(result)


nonempty_text = wire_text.filter(bool)
#: Names (commands, worker names) must be printable text: the protocol refuses others.
name_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Co", "Cn", "Zs",
                                                        "Zl", "Zp"),
                                  whitelist_characters=" "), min_size=1, max_size=30)
finite = st.floats(allow_nan=False, allow_infinity=False)


@FUZZ
@given(m=st.builds(Message, type=nonempty_text, data=json_objects, msg_id=nonempty_text,
                   timestamp=finite),
       req=st.builds(ApiRequest, command=name_text, data=json_objects,
                     request_id=name_text,
                     timeout=st.none() | st.floats(min_value=1e-6, max_value=86400)),
       resp=st.builds(ApiResponse, request_id=st.none() | wire_text, success=st.booleans(),
                      data=json_values, error=st.none() | wire_text,
                      processed_by=st.none() | wire_text),
       reg=st.builds(Registration,
                     worker_id=st.from_regex(r"[A-Za-z0-9._:@-]{1,40}", fullmatch=True),
                     name=name_text,
                     commands=st.lists(name_text, min_size=1, max_size=4),
                     weight=st.floats(min_value=1e-9, max_value=1e9),
                     max_concurrency=st.integers(1, 2**63 - 1),
                     no_retry=st.lists(name_text, max_size=3)))
def test_what_is_serialized_parses_back_to_the_same_object(
        m: Message, req: ApiRequest, resp: ApiResponse, reg: Registration) -> None:
    check_message(m)
    check_api_request(req)
    check_api_response(resp)
    check_registration(reg)
    check_request_body(RequestBody("x", m.data))
    check_response_body(ResponseBody(m.msg_id, resp.success, resp.data, resp.error))


# Found by this fuzzing: numbers beyond 64 bits were not carried faithfully (orjson
# parses them as floats). They are now, on both sides; beyond 4,300 digits the stdlib
# refuses them, and the frame is refused as malformed JSON.


@pytest.mark.parametrize("big", [2**64 + 1, -2**63 - 3, 3**50, 10**4000])
def test_integers_beyond_64_bits_round_trip(big: int) -> None:
    response = ApiResponse("r", True, {"n": [big]})
    assert ApiResponse.from_json(response.to_json()).data == {"n": [big]}
    assert ApiResponse.from_json(response.to_json().encode()).data == {"n": [big]}


def test_an_integer_of_more_than_4300_digits_is_refused_not_mangled() -> None:
    with pytest.raises(ProtocolError, match="Malformed JSON"):
        ApiResponse.from_json('{"request_id": "r", "success": true, "data": 1' + "0" * 5000
                              + "}")


@pytest.fixture
def stdlib_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser as a worker machine without orjson runs it."""
    monkeypatch.setattr(protocol.codec, "_loads", json.loads)
    monkeypatch.setattr(protocol.codec, "_DecodeError", protocol.STDLIB_DECODE_ERRORS)


@pytest.mark.usefixtures("stdlib_json")
@FUZZ
@given(raw=raw_texts.filter(lambda s: s.count("[") + s.count("{") < 500))
def test_parsers_without_orjson_raise_only_protocol_error(raw: str) -> None:
    """Nesting stays shallow here, to keep it fast; deep nesting is tested below."""
    for parse, check in PARSERS.values():
        result = outcome(parse, raw)
        if result is not None:
            check(result)


@pytest.mark.usefixtures("stdlib_json")
@pytest.mark.parametrize("raw", [
    '{"type": "x", "timestamp": 1' + "0" * 400 + "}",
    '{"type": "connect", "data": {"commands": ["a"], "weight": 1' + "0" * 400 + "}}",
    '{"type": "x", "data": {"n": 1' + "0" * 5000 + "}}",
    "[" * 100_000,
], ids=["huge-timestamp", "huge-weight", "5000-digit-int", "deep-nesting"])
def test_parsers_without_orjson_refuse_out_of_range_numbers_and_deep_nesting(raw: str) -> None:
    for parse, _check in PARSERS.values():
        try:
            parse(raw)
        except ProtocolError:
            pass


# ---------------------------------------------------------------------------- sockets

app = SocketRouter()
worker_ids = itertools.count()


@pytest.fixture
async def fresh_broker(async_db: None) -> AsyncIterator[None]:
    """An in-process broker; heartbeats are slow so the watchdog stays out of the way."""
    registry_module.reset_registry()
    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 30.0,
                                   "MAX_MESSAGE_BYTES": LIMIT}):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()


async def open_socket(path: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(app, path)
    comm.scope["client"] = ("127.0.0.1", 50000)
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    return comm


async def open_worker() -> tuple[WebsocketCommunicator, str]:
    worker_id = f"fuzz-{next(worker_ids)}"
    comm = await open_socket("/ws/worker/")
    reg = Registration(worker_id, worker_id, ["echo"], max_concurrency=100)
    await comm.send_to(text_data=Message("connect", reg.to_data()).to_json())
    assert Message.from_json(await comm.receive_from(TIMEOUT)).type == "connect"
    return comm, worker_id


async def send_raw(comm: WebsocketCommunicator, raw: str | bytes) -> None:
    """Any frame, empty ones included (``send_to`` refuses those)."""
    key = "bytes" if isinstance(raw, bytes) else "text"
    await comm.send_input({"type": "websocket.receive", key: raw})


def echo_result(params: dict[str, Any]) -> dict[str, Any]:
    """What the fuzzing worker answers: a digest of the params it got, so the answer
    proves they arrived intact and stays small (see the oversized-answer test below)."""
    return {"sha256": hashlib.sha256(dumps(params).encode()).hexdigest()}


async def answer_requests(w: WebsocketCommunicator) -> None:
    """Answer every request the worker holds now."""
    while not await w.receive_nothing(0):
        msg = Message.from_json(await w.receive_from(TIMEOUT))
        if msg.type == "request":
            await w.send_to(text_data=Message.response(
                msg.msg_id, True, echo_result(msg.data["params"])).to_json())


async def next_reply(r: WebsocketCommunicator, w: WebsocketCommunicator) -> dict[str, Any]:
    """The requester's next answer, answering whatever reaches the worker meanwhile."""
    for _ in range(int(REPLY_WAIT / 0.005)):
        await answer_requests(w)
        if not await r.receive_nothing(0.005, interval=0.001):
            return json.loads(await r.receive_from(TIMEOUT))
    raise AssertionError("the requester got no answer")


def on_the_wire(raw: str | bytes) -> bool:
    """Whether a real socket could deliver ``raw``: bytes, or text without lone surrogates."""
    return isinstance(raw, bytes) or not any(0xD800 <= ord(c) <= 0xDFFF for c in raw)


def request_frames() -> st.SearchStrategy[str | bytes]:
    multibyte = st.integers(LIMIT // 2 - 40, LIMIT // 2 + 40).map(
        lambda n: dumps({"command": "echo", "data": {"x": "é" * n}}))
    oversized = st.integers(LIMIT - 40, LIMIT + 40).map(
        lambda n: dumps({"command": "echo", "data": {"x": "a" * n}}))
    # (a text frame that is a JSON array is a batch: test_a_batch_frame_... below)
    single = raw_inputs.filter(lambda r: on_the_wire(r) and (isinstance(r, bytes) or
                                                             not protocol.is_batch(r)))
    return st.one_of(api_requests.map(dumps), single, multibyte, oversized)


ANY_ID = object()  # the frame named no request_id: the broker assigns one


def expected_replies(raw: str | bytes, worker_id: str) -> tuple[Any, list[dict[str, Any]]]:
    """(request_id, the answers allowed) for ``raw`` on the requester socket; an answer
    is allowed when it has every field of one of them."""
    if isinstance(raw, bytes):
        return None, [{"success": False, "data": None,
                       "error": "Binary frames are not supported: send JSON as text"}]
    size = len(raw.encode())
    if size > LIMIT:
        return None, [{"success": False, "data": None,
                       "error": f"Message too large: {size} bytes (limit {LIMIT})"}]
    try:
        request = ApiRequest.from_json(raw)
    except ProtocolError as exc:
        if exc.request_id is None:
            return None, [{"success": False, "data": None, "error": str(exc)}]
        named = protocol.loads_object(raw).get("request_id")
        return exc.request_id if named else ANY_ID, [
            {"success": False, "data": None, "error": str(exc)}]
    request_id = request.request_id if protocol.loads_object(raw).get("request_id") else ANY_ID
    if request.command != "echo":
        return request_id, [{"success": False, "data": None, "error": protocol.NO_WORKERS}]
    served = {"success": True, "data": echo_result(request.data), "error": None,
              "processed_by": worker_id}
    if request.timeout is not None and request.timeout < 1:  # a race with the worker
        return request_id, [served, {"success": False, "data": None,
                                     "error": protocol.TIMEOUT}]
    return request_id, [served]


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_broker")
@SOCKET_FUZZ
@given(frames=st.lists(request_frames(), min_size=1, max_size=6))
async def test_requester_socket_answers_every_frame_once_and_stays_usable(
        frames: list[str | bytes]) -> None:
    w, worker_id = await open_worker()
    r = await open_socket("/ws/requester/")
    try:
        for raw in frames:
            await send_raw(r, raw)
            reply = await next_reply(r, w)
            request_id, allowed = expected_replies(raw, worker_id)
            # The seed's five fields; a failure also carries its code.
            assert set(reply) - {"code"} == {"request_id", "success", "data", "error",
                                             "processed_by"}
            assert ("code" in reply) == (not reply["success"]), reply
            if request_id is ANY_ID:
                assert isinstance(reply["request_id"], str) and reply["request_id"]
            else:
                assert reply["request_id"] == request_id
            assert any({k: reply[k] for k in fields} == fields for fields in allowed), \
                (raw, reply)
        await answer_requests(w)
        assert await r.receive_nothing(0.01), "an extra answer arrived"
        # A fresh id: one sent lately is the same request (its kept answer comes back).
        after = f"after-{worker_id}"
        await r.send_json_to({"request_id": after, "command": "echo", "data": {"ok": 1}})
        assert await next_reply(r, w) == {"request_id": after, "success": True,
                                          "data": echo_result({"ok": 1}), "error": None,
                                          "processed_by": worker_id}
    finally:
        await r.disconnect()
        await w.disconnect()


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_broker")
@SOCKET_FUZZ
@given(elements=st.lists(api_requests | field_values, min_size=1, max_size=8))
async def test_a_batch_frame_gets_one_answer_per_element_and_the_socket_goes_on(
        elements: list[Any]) -> None:
    """A batch of anything (requests good and bad, ids repeated, things that are no
    object): one answer per element, named ones under their id, none more; then the
    socket still serves."""
    w, worker_id = await open_worker()
    r = await open_socket("/ws/requester/")
    try:
        await send_raw(r, dumps(elements))
        answers: list[dict[str, Any]] = []
        while len(answers) < len(elements):
            got = await next_reply(r, w)
            answers += got if isinstance(got, list) else [got]  # type: ignore[list-item]
        await answer_requests(w)
        assert await r.receive_nothing(0.01), "an extra answer arrived"
        assert len(answers) == len(elements)
        for answer in answers:
            assert set(answer) - {"code"} == {"request_id", "success", "data", "error",
                                              "processed_by"}, answer
        named = [e["request_id"] for e in elements if isinstance(e, dict) and
                 isinstance(e.get("request_id"), str) and e["request_id"].isprintable() and
                 0 < len(e["request_id"]) <= protocol.MAX_ID_CHARS]
        got_ids = [a["request_id"] for a in answers]
        assert all(got_ids.count(rid) >= named.count(rid) for rid in named), (elements,
                                                                             answers)
        after = f"after-{worker_id}"
        await r.send_json_to({"request_id": after, "command": "echo", "data": {"ok": 1}})
        got = await next_reply(r, w)
        assert (got if isinstance(got, list) else [got]) == [{  # type: ignore[comparison-overlap]
            "request_id": after, "success": True, "data": echo_result({"ok": 1}),
            "error": None, "processed_by": worker_id}]
    finally:
        await r.disconnect()
        await w.disconnect()


def known_type(kind: str) -> bool:
    return kind in {t.value for t in MessageType} or kind in message_handlers


def envelope_error(raw: str) -> str | None:
    """The parser's complaint about ``raw`` as an envelope, or None if it parses."""
    try:
        Message.from_json(raw)
    except ProtocolError as exc:
        return str(exc)
    return None


def body_error(parse: Callable[[Message], Any], data: dict[str, Any]) -> str | None:
    try:
        parse(Message("x", data))
    except ProtocolError as exc:
        return str(exc)
    return None


wrong_for_str = st.one_of(ints64, finite, st.booleans(), st.lists(scalars, max_size=2),
                          st.dictionaries(wire_text, scalars, max_size=2))
wrong_for_dict = st.one_of(ints64, finite, st.booleans(), wire_text,
                           st.lists(scalars, max_size=2))
wrong_for_number = st.one_of(st.booleans(), wire_text, st.lists(scalars, max_size=2),
                             st.dictionaries(wire_text, scalars, max_size=2))
msg_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


def bad_envelope() -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object whose envelope fields are wrong in at least one place."""
    return st.one_of(
        st.fixed_dictionaries({"type": wrong_for_str | st.just("")}),
        st.fixed_dictionaries({"type": st.just("heartbeat"), "data": wrong_for_dict}),
        st.fixed_dictionaries({"type": st.just("heartbeat"), "msg_id": wrong_for_str}),
        st.fixed_dictionaries({"type": st.just("heartbeat"), "timestamp": wrong_for_number}),
        st.fixed_dictionaries({"data": json_objects, "msg_id": msg_ids}),
    )


bad_response_data = st.one_of(
    st.fixed_dictionaries({"success": st.booleans()}),
    st.fixed_dictionaries({"request_id": wrong_for_str, "success": st.booleans()}),
    st.fixed_dictionaries({"request_id": msg_ids}),
    st.fixed_dictionaries({"request_id": msg_ids, "success": wrong_for_str.filter(
        lambda v: not isinstance(v, bool)) | wire_text}),
    st.fixed_dictionaries({"request_id": msg_ids, "success": st.booleans(),
                           "error": wrong_for_str}),
)
bad_request_data = st.one_of(
    st.fixed_dictionaries({"params": json_objects}),
    st.fixed_dictionaries({"action": wrong_for_str | st.just("")}),
    st.fixed_dictionaries({"action": st.just("get_time"), "params": wrong_for_dict}),
)


def worker_frames() -> st.SearchStrategy[tuple[str | bytes, str, str | None]]:
    """(frame, the error it must get, the reply_to it must carry) for frames a worker
    should never send; ``reply_to`` None means the envelope could not be read."""
    not_envelopes = st.one_of(st.text(max_size=40), json_values.map(dumps), damaged, deep,
                              bad_envelope().map(dumps)).filter(
        lambda s: on_the_wire(s) and len(s.encode()) <= LIMIT and envelope_error(s) is not None)
    unknown_type = st.tuples(wire_text.filter(lambda t: t and not known_type(t)), msg_ids).map(
        lambda t: (dumps({"type": t[0], "msg_id": t[1], "data": {}}),
                   f"Unknown message type '{protocol.quote(t[0])}'", t[1]))
    bad_response = st.tuples(bad_response_data, msg_ids).map(
        lambda t: (dumps({"type": "response", "msg_id": t[1], "data": t[0]}),
                   body_error(ResponseBody.from_message, t[0]), t[1]))
    bad_request = st.tuples(bad_request_data, msg_ids).map(
        lambda t: (dumps({"type": "request", "msg_id": t[1], "data": t[0]}),
                   body_error(RequestBody.from_message, t[0]), t[1]))
    connect_again = msg_ids.map(lambda i: (
        Message("connect", {"commands": ["echo"]}, msg_id=i).to_json(),
        "Already registered on this connection", i))
    oversized = st.integers(LIMIT + 1, LIMIT + 300).map(
        lambda n: Message.heartbeat(pad="x" * n).to_json())
    return st.one_of(
        st.binary().map(lambda b: (b, "Binary frames are not supported: send JSON as text",
                                   None)),
        not_envelopes.map(lambda s: (s, envelope_error(s), None)),
        oversized.map(lambda s: (s, f"Message too large: {len(s.encode())} bytes "
                                    f"(limit {LIMIT})", None)),
        unknown_type, bad_response, bad_request, connect_again,
    )


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("fresh_broker")
@SOCKET_FUZZ
@given(frames=st.lists(worker_frames(), min_size=1, max_size=6))
async def test_worker_socket_refuses_bad_frames_and_still_answers_its_request(
        frames: list[tuple[str | bytes, str, str | None]]) -> None:
    w, worker_id = await open_worker()
    r = await open_socket("/ws/requester/")
    held_id = f"held-{worker_id}"  # fresh: an id sent lately is that same request
    try:
        await r.send_json_to({"request_id": held_id, "command": "echo", "data": {"n": 1}})
        held = Message.from_json(await w.receive_from(TIMEOUT))
        assert held.type == "request"
        for raw, error, reply_to in frames:
            assert error, "the strategy must only make refused frames"
            await send_raw(w, raw)
            assert not await w.receive_nothing(REPLY_WAIT, interval=0.001), \
                f"no answer to {raw!r}"
            refusal = Message.from_json(await w.receive_from(TIMEOUT))
            assert refusal.type == "error", (raw, refusal)
            assert refusal.data["error"] == error, raw
            if reply_to is not None:
                assert refusal.data["reply_to"] == reply_to
        assert await w.receive_nothing(0.01), "a frame got more than one answer"
        assert await r.receive_nothing(0), "the requester was answered before the worker"
        await w.send_to(text_data=Message.response(held.msg_id, True, "kept").to_json())
        assert json.loads(await r.receive_from(TIMEOUT)) == {
            "request_id": held_id, "success": True, "data": "kept", "error": None,
            "processed_by": worker_id}
    finally:
        await r.disconnect()
        await w.disconnect()


# Found while writing these tests.


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_broker")
async def test_a_worker_answer_beyond_64_bits_reaches_the_requester_exactly() -> None:
    w, _ = await open_worker()
    r = await open_socket("/ws/requester/")
    try:
        await r.send_json_to({"request_id": "big", "command": "echo"})
        held = Message.from_json(await w.receive_from(TIMEOUT))
        await w.send_to(text_data=Message.response(held.msg_id, True, 2**64 + 1).to_json())
        assert json.loads(await r.receive_from(TIMEOUT))["data"] == 2**64 + 1
    finally:
        await r.disconnect()
        await w.disconnect()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_broker")
async def test_a_response_to_a_request_the_worker_does_not_hold_gets_an_error_frame() -> None:
    w, _ = await open_worker()
    try:
        forged = Message.response("never-sent", True, "forged")
        await w.send_to(text_data=forged.to_json())
        assert not await w.receive_nothing(0.5), "no answer to a forged response"
        refusal = Message.from_json(await w.receive_from(TIMEOUT))
        assert refusal.type == "error" and refusal.data["reply_to"] == forged.msg_id
    finally:
        await w.disconnect()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_broker")
async def test_a_worker_answer_over_the_frame_limit_fails_its_request_at_once() -> None:
    w, _ = await open_worker()
    r = await open_socket("/ws/requester/")
    try:
        await r.send_json_to({"request_id": "big", "command": "echo", "timeout": 20})
        held = Message.from_json(await w.receive_from(TIMEOUT))
        answer = Message.response(held.msg_id, True, "x" * LIMIT)
        started = asyncio.get_running_loop().time()
        await w.send_to(text_data=answer.to_json())
        told = Message.from_json(await w.receive_from(TIMEOUT))
        assert told.type == "error" and told.data["reply_to"] == answer.msg_id
        assert "Worker answer too large" in told.data["error"]
        reply = json.loads(await r.receive_from(TIMEOUT))
        assert asyncio.get_running_loop().time() - started < 1.0
        assert reply["request_id"] == "big" and not reply["success"]
        assert reply["error"].startswith("Worker answer too large: ")
        assert f"> limit {LIMIT}" in reply["error"]
        [entry] = await registry_module.get_registry().all()
        assert entry.in_flight == 0  # the slot is free again
    finally:
        await r.disconnect()
        await w.disconnect()


@pytest.mark.timeout(30)
@pytest.mark.usefixtures("fresh_broker")
async def test_a_dropped_worker_is_not_registered_again_by_a_frame_it_sent_before() -> None:
    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 0.2,
                                   "MAX_MESSAGE_BYTES": LIMIT}):
        w, worker_id = await open_worker()
        # It talks but never answers the broker's pings: cut off after 0.8 s.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        closed = None
        while closed is None and loop.time() < deadline:
            await w.send_to(text_data=Message.heartbeat().to_json())
            while closed is None and not await w.receive_nothing(0.05):
                out = await w.receive_output(TIMEOUT)
                closed = out if out["type"] == "websocket.close" else None
        assert closed is not None and closed["code"] == 4003
        # One of its heartbeats was still on its way when the broker cut it off.
        await w.send_to(text_data=Message.heartbeat().to_json())
        assert await w.receive_nothing(0.1)
        await w.disconnect()
        listed = {e.worker_id for e in await registry_module.get_registry().all()}
        r = await open_socket("/ws/requester/")
        try:
            await r.send_json_to({"request_id": "x", "command": "echo", "timeout": 0.5})
            reply = json.loads(await r.receive_from(TIMEOUT))
        finally:
            await r.disconnect()
        assert worker_id not in listed
        assert reply["error"] == protocol.NO_WORKERS
