"""Deferred jobs (``not_before``), jobs that wait for a worker, and ``dispatch.fleet``
inside a broker process: over the requester socket's consumers, in-process."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from dispatch import fleet
from dispatch import registry as registry_module
from dispatch.auth import stop_guard
from dispatch.core.dispatcher import stop_dispatcher
from tests.test_consumers import TIMEOUT, answer, ask, frame, no_request, open_socket, requester
from workers.errors import Cancelled
from workers.protocol import Message, Registration

pytestmark = [pytest.mark.timeout(30)]


@pytest.fixture(autouse=True)
async def fresh_broker(async_db: None) -> AsyncIterator[None]:
    registry_module.reset_registry()
    # Heartbeats far apart: these workers stay quiet while a test waits.
    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 10}):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()


async def worker(worker_id: str, *commands: str) -> WebsocketCommunicator:
    comm = await open_socket("/ws/worker/")
    reg = Registration(worker_id, worker_id, list(commands), max_concurrency=4)
    await comm.send_to(text_data=Message("connect", reg.to_data()).to_json())
    await frame(comm, "connect")
    return comm


async def test_a_deferred_request_reaches_its_worker_not_before_its_time() -> None:
    w, r = await worker("w1", "echo"), await requester()
    sent = time.time()
    await ask(r, "echo", "later", data={"x": 1}, not_before=sent + 0.6, timeout=0.5,
              accepted=True)
    assert (await r.receive_json_from(TIMEOUT))["event"] == "accepted"
    assert await no_request(w, 0.45)
    await answer(w)  # its timeout (0.5 s) counts from its time, not from its arrival
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["success"] and reply["data"] == {"x": 1}
    assert time.time() - sent >= 0.6


async def test_a_deferred_request_cancelled_before_its_time_never_runs() -> None:
    w, r = await worker("w1", "echo"), await requester()
    await ask(r, "echo", "later", not_before=time.time() + 0.5)
    await r.send_json_to({"cancel": "later"})
    assert await no_request(w, 0.8)  # (answering the worker's pings meanwhile)
    assert (await r.receive_json_from(TIMEOUT))["code"] == "cancelled"


async def test_bad_not_before_and_keep_are_refused_with_the_field_named() -> None:
    r = await requester()
    await ask(r, "echo", "a", not_before="tomorrow")
    assert "not_before" in (await r.receive_json_from(TIMEOUT))["error"]
    await ask(r, "echo", "b", keep=-1)
    assert "keep" in (await r.receive_json_from(TIMEOUT))["error"]
    await ask(r, "echo", "c", task="a\nb")
    assert "printable" in (await r.receive_json_from(TIMEOUT))["error"]
    # Beyond the broker's limits: a row held for years is a tenant's way to fill a disk.
    await ask(r, "echo", "d", not_before=time.time() + 40 * 86400)
    assert "MAX_DEFER" not in (reply := await r.receive_json_from(TIMEOUT))["error"]
    assert "'not_before' is over this broker's limit" in reply["error"]
    await ask(r, "echo", "e", keep=300 * 86400)
    assert "'keep' is over this broker's limit" in (await r.receive_json_from(TIMEOUT))["error"]
    with pytest.raises(ValueError, match="'keep' is over"):
        await fleet.astart("echo", {}, keep=300 * 86400)


async def test_wait_for_workers_holds_a_request_until_a_worker_offers_its_command() -> None:
    r = await requester()
    await ask(r, "resize", "queued", wait_for_workers=True, timeout=5)
    await ask(r, "resize", "plain")  # without it: no worker is an answer at once
    assert (await r.receive_json_from(TIMEOUT))["code"] == "no_workers"
    assert await r.receive_nothing(0.3)
    w = await worker("late", "resize")
    await answer(w, "done")
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["request_id"] == "queued" and reply["data"] == "done"


async def test_fleet_inside_a_broker_process_submits_directly() -> None:
    w = await worker("w1", "echo")
    job = await fleet.astart("echo", {"n": 1})  # the dispatcher runs on this loop
    assert fleet.broker_loop() is asyncio.get_running_loop()
    request = await answer(w)
    assert request.data["params"] == {"n": 1}
    assert await job.aresult() == {"n": 1}
    assert await job.aresult() == {"n": 1}  # a result is there as often as asked

    slow = await fleet.astart("echo", {"n": 2})
    await frame(w, "request")
    await slow.acancel()
    with pytest.raises(Cancelled):
        await slow.aresult()
    with pytest.raises(RuntimeError, match="acall"):  # it would block the loop it needs
        fleet.call("echo", {})


async def test_answers_kept_long_are_bounded_per_credential() -> None:
    """``keep`` (and dead letters) hold rows for weeks: a credential's bytes of them are
    bounded (MAX_KEPT_BYTES); beyond, its answers are kept RESULT_TTL only."""
    from asgiref.sync import sync_to_async

    from dispatch.core.dispatcher import get_dispatcher
    from dispatch.models import Job

    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 10,
                                   "MAX_KEPT_BYTES": 8000}):  # two of them, about
        w, r = await worker("w1", "echo"), await requester()
        for n in range(4):
            await ask(r, "echo", f"k{n}", data={"text": "x" * 1500}, keep=86400)
            await answer(w)
            assert (await r.receive_json_from(TIMEOUT))["success"]
        await (await get_dispatcher()).keeper.committed()
    kept = await sync_to_async(lambda: dict(Job.objects.filter(
        request_id__startswith="k").values_list("request_id", "expires_at")))()
    flags = [bool(kept[f"k{n}"]) for n in range(4)]
    assert flags[0] and not flags[-1] and flags == sorted(flags, reverse=True), flags
