"""dispatch.redis.layer: channels-redis's layer in fewer round trips, on a real Redis."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import pytest
import redis
from channels.exceptions import ChannelFull
from channels_redis.core import RedisChannelLayer as PlainLayer

from dispatch.redis.layer import RedisChannelLayer


@pytest.fixture
async def make_layer(redis_url: str, redis_prefix: str
                     ) -> AsyncIterator[Callable[..., PlainLayer]]:
    """Layers on the test's Redis prefix; ``cls`` picks ours or channels-redis's own."""
    made: list[PlainLayer] = []

    def make(cls: type[PlainLayer] = RedisChannelLayer, **config: object) -> PlainLayer:
        layer = cls(hosts=[redis_url], prefix=f"{redis_prefix}:asgi", **config)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close_pools()


async def test_messages_reach_each_channel_of_a_process_in_order(make_layer) -> None:
    sender, receiver = make_layer(), make_layer()
    first, second = await receiver.new_channel(), await receiver.new_channel()
    for i in range(50):
        await sender.send(first if i % 2 else second, {"type": "t", "i": i})
    # One receive takes everything waiting; the rest waits in the process's buffers.
    got_first = [(await receiver.receive(first))["i"] for _ in range(25)]
    got_second = [(await receiver.receive(second))["i"] for _ in range(25)]
    assert got_first == list(range(1, 50, 2)) and got_second == list(range(0, 50, 2))


async def test_group_messages_taken_with_others_in_one_receive_reach_their_channel(
        make_layer) -> None:
    """A group_send's message names its channels in a list: one taken with others in
    one receive (not the newest of them) is buffered for its channel all the same."""
    sender, receiver = make_layer(), make_layer()
    inbox = await receiver.new_channel()
    await receiver.group_add("everyone", inbox)
    await sender.group_send("everyone", {"type": "g", "i": 0})
    await sender.send(inbox, {"type": "t", "i": 1})
    await sender.group_send("everyone", {"type": "g", "i": 2})
    got = [await asyncio.wait_for(receiver.receive(inbox), 5) for _ in range(3)]
    assert [m["i"] for m in got] == [0, 1, 2]


async def test_a_receive_on_an_empty_channel_waits_for_the_next_message(make_layer) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    waiting = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await make_layer().send(channel, {"type": "late"})
    assert (await asyncio.wait_for(waiting, 5))["type"] == "late"


async def test_a_full_channel_refuses_more(make_layer) -> None:
    layer = make_layer(capacity=3)
    channel = await layer.new_channel()
    for i in range(3):
        await layer.send(channel, {"type": "t", "i": i})
    with pytest.raises(ChannelFull):
        await layer.send(channel, {"type": "t", "i": 3})


async def test_it_shares_a_redis_with_channels_redis_own_layer(make_layer) -> None:
    ours, theirs = make_layer(), make_layer(PlainLayer)
    mine = await ours.new_channel()
    await theirs.send(mine, {"type": "from-theirs"})
    assert (await ours.receive(mine))["type"] == "from-theirs"
    other = await theirs.new_channel()
    await ours.send(other, {"type": "from-ours"})
    assert (await theirs.receive(other))["type"] == "from-ours"
    await ours.send("general", {"type": "plain"})
    assert (await theirs.receive("general"))["type"] == "plain"


async def test_nothing_is_left_behind_in_redis(make_layer, redis_url: str,
                                               redis_prefix: str) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    for i in range(20):
        await layer.send(channel, {"type": "t", "i": i})
    for _ in range(20):
        await layer.receive(channel)
    await asyncio.gather(*layer.receive_cleaners)
    with redis.Redis.from_url(redis_url) as client:
        assert list(client.scan_iter(match=f"{redis_prefix}:*")) == []


async def test_a_listener_stops_with_its_owner_even_if_its_cancel_is_lost(make_layer) -> None:
    """dispatch.core.inbox.listen checks ``wanted`` around each receive, so a listener whose
    cancellation got lost in a blocking read still ends at its next message."""
    from dispatch.core.inbox import listen

    layer = make_layer()
    channel = await layer.new_channel()
    handled: list[int] = []
    owner_alive = True

    async def handle(message: dict) -> None:
        handled.append(message["i"])

    task = asyncio.create_task(listen(layer, channel, handle, "test", lambda: owner_alive))
    await layer.send(channel, {"type": "t", "i": 1})
    for _ in range(100):
        if handled:
            break
        await asyncio.sleep(0.02)
    owner_alive = False  # the consumer is gone; nobody cancels the listener
    await layer.send(channel, {"type": "t", "i": 2})
    await asyncio.wait_for(task, 5)
    assert handled == [1]


def test_integers_beyond_64_bits_and_kept_json_cross_processes_exact() -> None:
    """msgpack refuses integers beyond 64 bits and does not know orjson's Fragments
    (huge integers the broker keeps as they came): a request holding one was lost
    between processes, with the others of its batch."""
    import orjson

    from dispatch.redis.layer import Serializer

    message = {"type": "x", "data": [10**30, -(10**40), 7, orjson.Fragment(b"9" * 4300)]}
    back = Serializer().deserialize(Serializer().serialize(message))
    assert back["data"][:3] == message["data"][:3]
    assert orjson.dumps(back["data"][3]) == b"9" * 4300


async def test_an_event_that_cannot_be_written_does_not_lose_its_batch() -> None:
    from collections import Counter

    from dispatch.core import events
    from dispatch.core.exchange import Exchange

    class Layer:
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send(self, channel: str, message: dict) -> None:
            if "cannot" in str(message):
                raise TypeError("cannot serialize")
            self.sent.extend(m["key"] for m in message.get("messages", [message]))

    layer, lost = Layer(), []
    exchange = Exchange(layer, Counter())  # type: ignore[arg-type]

    async def undelivered(batch: list, exc: Exception) -> None:
        lost.extend(e.key for e in batch)

    exchange.undelivered = undelivered
    batch = [events.Lost(key, "w", reason) for key, reason in
             (("a", "ok"), ("b", "cannot"), ("c", "ok"))]
    await exchange._send_one("elsewhere", batch)
    assert layer.sent == ["a", "c"] and lost == ["b"]
