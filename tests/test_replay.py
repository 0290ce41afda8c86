"""Dead letters: a job that failed for want of a worker is kept, listed in the admin,
and run again from there (same command and data, a new request id, linked)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import Client, override_settings
from django.urls import reverse

from dispatch import registry as registry_module
from dispatch.auth import stop_guard
from dispatch.core.dispatcher import get_dispatcher, stop_dispatcher
from dispatch.models import DeadLetter, Job
from tests.test_consumers import TIMEOUT, ask, frame, requester
from tests.test_deferred import worker
from workers.protocol import ErrorCode, Message

pytestmark = [pytest.mark.timeout(30)]


@pytest.fixture(autouse=True)
async def fresh_broker(async_db: None) -> AsyncIterator[None]:
    registry_module.reset_registry()
    with override_settings(BROKER={"HISTORY": False, "HEARTBEAT_INTERVAL": 10,
                                   "MAX_RETRIES": 0}):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()


async def rows(**where: object) -> list[Job]:
    return await sync_to_async(lambda: list(Job.objects.filter(**where)))()


async def test_a_lost_job_is_a_dead_letter_that_the_admin_runs_again() -> None:
    w1, r = await worker("w1", "resize"), await requester()
    await ask(r, "resize", "old", data={"x": 1}, priority=3, timeout=20)
    await frame(w1, "request")
    await w1.disconnect()  # its worker died with it, and MAX_RETRIES is 0
    reply = await r.receive_json_from(TIMEOUT)
    assert reply["code"] == "worker_lost"
    await (await get_dispatcher()).keeper.committed()
    (dead,) = await sync_to_async(lambda: list(DeadLetter.objects.all()))()
    assert dead.request_id == "old" and dead.code == "worker_lost" and dead.expires_at

    # An answer that is no dead letter (the handler said no) is not listed.
    w2 = await worker("w2", "resize")
    await ask(r, "resize", "refused", data={})
    request = await frame(w2, "request")
    await w2.send_to(text_data=Message.response(request.msg_id, False, None, "no",
                                                ErrorCode.COMMAND_ERROR).to_json())
    assert (await r.receive_json_from(TIMEOUT))["code"] == "command_error"

    def run_again() -> str:
        admin = User.objects.create_superuser("ops", password="x")
        client = Client()
        client.force_login(admin)
        url = reverse("admin:dispatch_deadletter_changelist")
        page = client.get(url).content.decode()
        assert "old" in page and "refused" not in page
        done = client.post(url, {"action": "run_again", "_selected_action": [dead.pk]},
                           follow=True)
        twice = client.post(url, {"action": "run_again", "_selected_action": [dead.pk]},
                            follow=True)  # a second click runs nothing more
        assert "already run again as" in twice.content.decode()
        return done.content.decode()

    page = asyncio.ensure_future(sync_to_async(run_again)())
    again = await frame(w2, "request")  # the same command and data, to a live worker
    assert again.data["params"] == {"x": 1} and again.data["action"] == "resize"
    # (Answered once the page is done: the test database, SQLite in memory, locks whole
    # tables while the job store commits.)
    assert "Running again: old as" in await page
    await w2.send_to(text_data=Message.response(again.msg_id, True, "ok").to_json())
    (new,) = await rows(replay_of="old")
    assert new.request_id != "old"
    await (await get_dispatcher()).keeper.committed()
    (new,) = await rows(replay_of="old")
    assert new.state == Job.State.DONE and '"ok"' in new.answer
