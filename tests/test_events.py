"""Events between broker processes: typed objects in, layer dicts only at the edge."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from dispatch.core import events
from dispatch.core.events import (Ask, AskKind, Asked, Cancel, Chunk, ChunkAck, CloseWorker,
                                  Forward, Lost, Notify, Progress, Reply, UnknownEvent,
                                  Watched)

EXAMPLES = [
    Forward("k1", "echo", {"message": "hi"}, "inbox.a", 5.0, "w1", "worker.s1", True, "tp"),
    Reply("k1", "w1", True, {"n": [1, 2]}, None, 1.5),
    Reply("k2", "w1", False, None, "boom", 2.0, "handler_failed"),
    Lost("k1", "w1", "connection closed"),
    Progress("k1", "w1", 0.5, "half"),
    Chunk("k1", "w1", 3, "part", "inbox.b", "worker.s1"),
    ChunkAck("k1", "worker.s1", 3),
    Cancel("k1", "worker.s1", "cancelled by the requester"),
    Ask(AskKind.ATTACH, "credential:1", "r1", "inbox.a", "t1", key="x", stream=True),
    Ask(AskKind.CANCEL, None, "r1", "inbox.a", "t2", reason="by an operator"),
    Asked("t1", 1),
    Watched("x", '{"request_id": "r1"}', final=True),
    Notify("hello", {"level": "info"}),
    CloseWorker("worker.s1", "Replaced", 4005),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_survives_the_layer_as_it_serializes(event: events.Event) -> None:
    """What channels-redis does to a message (msgpack) gives back an equal event."""
    wire = msgpack.unpackb(msgpack.packb(events.to_layer(event)))
    assert list(events.from_layer(wire)) == [event]


def test_events_for_one_inbox_travel_as_one_batch_and_a_bad_one_loses_no_other() -> None:
    message = events.batch_to_layer(EXAMPLES[:3])
    assert message["type"] == events.BATCH and len(message["messages"]) == 3
    message["messages"].insert(1, {"type": "broker.from_the_future", "x": 1})
    message["messages"].append({"type": Lost.TYPE, "key": "k9"})  # fields missing
    got = list(events.from_layer(message))
    assert [type(e) for e in got] == [Forward, UnknownEvent, Reply, Reply, UnknownEvent]
    assert events.batch_to_layer(EXAMPLES[:1]) == events.to_layer(EXAMPLES[0])  # no batch of one


def test_an_ask_of_an_unknown_kind_is_refused_not_acted_on() -> None:
    wire = events.to_layer(EXAMPLES[8]) | {"kind": "delete_everything"}
    [got] = events.from_layer(wire)
    assert isinstance(got, UnknownEvent)


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXAMPLES[0].key = "other"  # type: ignore[misc]
