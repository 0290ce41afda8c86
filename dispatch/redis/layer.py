"""channels-redis's ``RedisChannelLayer`` in fewer round trips per message.

channels-redis sends a message with four commands, each its own round trip (drop
expired messages, count against capacity, add, set expiry), and receives one with
three (put back what a cancelled receive left, blocking pop, back the message up)
plus one more later (drop the backup). Between broker processes under load that is
most of what a request costs, and a process receives its messages one at a time.

Here a send is one script. A receive on a process's channels takes everything
waiting (up to :data:`RECEIVE_BATCH`) in one script, and hands what is for other
channels of the process to their buffers, as channels-redis does with one message;
only when nothing waits does it block, with one BZPOPMIN and without channels-redis's
backup of the popped message (two more round trips, one of them before the message
is handed over; see :meth:`RedisChannelLayer.receive_single`).

Same keys, same data structures, same guarantees (capacity, expiry, the backup that
protects a message from a cancelled receive): processes using this layer and ones
using channels-redis's own can share a Redis.

Messages are msgpack, as channels-redis's, plus what msgpack cannot carry and a
request may hold: integers beyond 64 bits, and the ones the broker keeps as they came
(:func:`workers.protocol.relayed`), as extension types (:class:`Serializer`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import msgpack
import orjson
from channels.exceptions import ChannelFull
from channels_redis import core
from channels_redis.serializers import BaseMessageSerializer, registry

from . import scripts

log = logging.getLogger("dispatch.redis.layer")

_SEND = scripts.load("send")

#: Most messages one receive takes off a process's channel at once.
RECEIVE_BATCH = 256

_POP = scripts.load("pop")

#: msgpack extension types: an integer beyond 64 bits (its digits), and JSON kept as
#: it came (an orjson Fragment).
BIG_INT, VERBATIM = 1, 2


def _pack(value: Any) -> msgpack.ExtType:
    if isinstance(value, int):
        return msgpack.ExtType(BIG_INT, str(value).encode())
    if isinstance(value, orjson.Fragment):
        return msgpack.ExtType(VERBATIM, orjson.dumps(value))
    raise TypeError(f"cannot pass a {type(value).__name__} between broker processes")


def _unpack(code: int, data: bytes) -> Any:
    if code == BIG_INT:
        return int(data)
    if code == VERBATIM:
        return orjson.Fragment(data)
    return msgpack.ExtType(code, data)


class Serializer(BaseMessageSerializer):
    """channels-redis's msgpack, with :data:`BIG_INT` and :data:`VERBATIM` (settings:
    ``serializer_format``); what msgpack carries itself is written as before."""

    as_bytes = staticmethod(functools.partial(msgpack.packb, default=_pack))
    from_bytes = staticmethod(functools.partial(msgpack.unpackb, ext_hook=_unpack))


registry.register_serializer("dispatch", Serializer)


class RedisChannelLayer(core.RedisChannelLayer):
    """The Redis channel layer of a broker cluster (settings pick it when Redis is configured)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        if "!" in channel:  # process-local: the full name travels in the message
            message = {**message, "__asgi_channel__": channel}
            key = self.prefix + self.non_local_name(channel)
            index = self.consistent_hash(channel)
        else:
            key = self.prefix + channel
            index = next(self._send_index_generator)
        now = time.time()
        added = await _SEND(client=self.connection(index), keys=[key], args=[
            int(now) - int(self.expiry), self.get_capacity(channel), self.serialize(message),
            now, int(self.expiry)])
        if not added:
            raise ChannelFull()

    async def receive_single(self, channel: str) -> tuple[str, dict[str, Any]]:
        """One message of this process's channels; the others taken with it are buffered.

        The caller (channels-redis's ``receive``) holds the process's receive lock.
        As in channels-redis, the messages stay in a backup until handed over, and a
        per-channel lock keeps the next receive from starting before that is cleared.
        """
        if "!" not in channel:  # a general channel: one message, as channels-redis does
            return await super().receive_single(channel)
        assert self.require_valid_channel_name(channel, receive=True), "Channel name invalid"
        index = self.consistent_hash(channel)
        key = self.prefix + channel
        backup = self._backup_channel_name(key)
        await self.receive_clean_locks.acquire(key)
        try:
            members: list[bytes] = await _POP(client=self.connection(index),
                                              keys=[key, backup], args=[RECEIVE_BATCH])
            blocked = not members
            while not members:  # nothing waiting: block until something is
                popped = await self.connection(index).bzpopmin(key, timeout=self.brpop_timeout)
                members = [] if popped is None else [popped[1]]
        except BaseException:
            self.receive_clean_locks.release(key)
            raise
        if blocked:
            # channels-redis backs a blocking pop's message up and deletes the backup
            # later: two more round trips, one of them before the message is handed
            # over (0.3 ms here on every hop at low load). Nothing can cancel this
            # receive between the pop's reply and the handing over (no await), so
            # there is nothing to protect; the backup is empty (the script cleared it).
            self.receive_clean_locks.release(key)
            return self._addressed(self.deserialize(members[0]))
        cleaner = asyncio.ensure_future(self.connection(index).delete(backup))
        self.receive_cleaners.append(cleaner)

        def cleaned(task: asyncio.Future[Any]) -> None:
            self.receive_cleaners.remove(task)
            self.receive_clean_locks.release(key)
            if not task.cancelled() and task.exception() is not None:
                # Redis went away between the pop and this: the backup key expires by
                # itself, and the outage is reported by whoever receives next.
                log.debug("could not delete %s: %s", backup, task.exception())

        cleaner.add_done_callback(cleaned)
        # The caller buffers the message returned after these: the newest, so that each
        # channel's messages stay in order.
        *older, newest = (self._addressed(self.deserialize(m)) for m in members)
        for target, message in older:
            # A group_send's message names its channels in a list (channels-redis's
            # receive unpacks that for the one it returns; these are buffered here).
            for channel in target if isinstance(target, list) else [target]:
                self.receive_buffer[channel].put_nowait(message)
        return newest

    @staticmethod
    def _addressed(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return message.pop("__asgi_channel__"), message
