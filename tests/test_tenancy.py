"""Tenancy against a real daphne broker: one tenant's tokens cannot reach, pose as or
out-weigh another's workers.

The attack of issue 24: B's worker token (limited to ``echo``) registered with A's
labels, A's worker's name, weight 1e300 and concurrency 1,000, and got every request of
A's key, selectors and affinity keys included. With pools, A's key is served by A's
pool only, and a worker token carries the pools, labels, version and highest weight
its credential gives it, whatever the worker claims.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.procs import wait_for
from tests.test_trust import FAST_AUTH, register
from workers.protocol import Message, Registration
from workers.requester import Requester, Route

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_tenants_requests_never_reach_another_tenants_worker(broker_factory,
                                                               spawn_worker) -> None:
    broker = broker_factory(env=FAST_AUTH)
    a_fleet, b_fleet, a_app, b_app, open_key, admin = broker.tokens(
        ["create", "worker", "a-fleet", "--pool", "a"],
        ["create", "worker", "b-fleet", "--pool", "b", "--commands", "echo",
         "--max-weight", "5"],
        ["create", "requester", "a-app", "--pool", "a"],
        ["create", "requester", "b-app", "--pool", "b"],
        ["create", "requester", "operator"],  # no pool: reaches every worker
        ["create", "admin", "ops"])
    broker.wait_credentials(admin)
    spawn_worker("a-gpu", "--token", a_fleet, "--label", "gpu=a100", wait=False, target=broker)
    victim = wait_for(lambda: broker.workers_as(admin), 15, "A's worker to register")[0]

    async def scenario() -> None:
        # B's worker claims A's pool outright: refused.
        ws, answer = await register(broker, b_fleet, Registration(
            "b-claims-a", "a-gpu", ["echo"], labels={"@pool:a": "1"}))
        assert answer.type == "error" and "given by the broker" in answer.data["error"]
        await ws.close()
        # B's worker poses as A's: A's name and labels, every weight and slot it can ask.
        impostor, answer = await register(broker, b_fleet, Registration(
            "b-impostor", "a-gpu", ["echo"], weight=1e300, max_concurrency=1000,
            labels={"gpu": "a100"}))
        assert answer.type == "connect" and answer.data["weight"] == 5.0
        served = {}
        async with Requester(broker.requester_url, token=a_app) as a:
            for i in range(30):
                for how, route in (("select", Route(select={"gpu": "a100"})), ("plain", None),
                                   ("affinity", Route(affinity="user-42"))):
                    response = await a.request("echo", {"message": f"{how} {i}"}, route=route)
                    assert response.success, response
                    served[response.processed_by] = served.get(response.processed_by, 0) + 1
        assert served == {victim["worker_id"]: 90}  # the impostor saw none of A's data
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(impostor.recv(), 0.3)  # not even one frame
        # B's key is served by B's workers only: A's get_time is not there for it.
        async with Requester(broker.requester_url, token=b_app) as b:
            refused = await b.request("get_time", {})
            assert not refused.success and refused.code == "no_workers", refused
            pending = asyncio.ensure_future(b.request("echo", {"message": "for b"}))
            frame = Message.from_json(await asyncio.wait_for(impostor.recv(), 5))
            assert frame.data["params"] == {"message": "for b"}  # B's own worker serves B
            await impostor.send(Message.response(frame.msg_id, True, "b's answer").to_json())
            assert (await pending).data == "b's answer"
        # A key without a pool (the operator's, or a single team's) reaches both.
        async with Requester(broker.requester_url, token=open_key) as anyone:
            assert (await anyone.request("get_time", {})).success
        await impostor.close()

    asyncio.run(scenario())
    listed = {w["worker_id"]: w for w in broker.workers_as(admin)}
    assert listed[victim["worker_id"]]["labels"] == {"gpu": "a100", "@pool:a": "1"}


def test_a_worker_token_pins_labels_version_and_weight(broker_factory) -> None:
    broker = broker_factory(env=FAST_AUTH)
    pinned, admin = broker.tokens(
        ["create", "worker", "t4-fleet", "--label", "gpu=t4", "--version", "v1",
         "--max-weight", "2"], ["create", "admin", "ops"])
    broker.wait_credentials(admin)

    async def scenario() -> None:
        for claim, refusal in (({"labels": {"gpu": "a100"}}, "label 'gpu' is 't4'"),
                               ({"version": "v2-canary"}, "version is 'v1'")):
            ws, answer = await register(broker, pinned, Registration("w", "w", ["echo"],
                                                                     **claim))
            assert answer.type == "error" and refusal in answer.data["error"], answer
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 4002
        ws, answer = await register(broker, pinned, Registration(
            "w", "w", ["echo"], weight=50, labels={"region": "eu"}))
        assert answer.type == "connect" and answer.data["weight"] == 2.0
        [listed] = broker.workers_as(admin)
        assert listed["labels"] == {"gpu": "t4", "region": "eu"}
        assert listed["version"] == "v1"
        await ws.close()

    asyncio.run(scenario())


def test_a_changed_credential_sends_its_workers_back_to_take_the_new_rights(
        broker_factory, spawn_worker) -> None:
    """Moving a token to another pool must not leave its live workers serving the old."""
    broker = broker_factory(env=FAST_AUTH)
    fleet, a_app, admin = broker.tokens(
        ["create", "worker", "fleet", "--pool", "a"],
        ["create", "requester", "a-app", "--pool", "a"], ["create", "admin", "ops"])
    broker.wait_credentials(admin)
    spawn_worker("w", "--token", fleet, wait=False, target=broker)
    wait_for(lambda: broker.workers_as(admin), 15, "the worker to register")
    moved = broker.manage("shell", "-c", "from dispatch.models import Credential; "
                          "Credential.objects.filter(name='fleet').update(pools=['b'])")
    assert moved.returncode == 0, moved.stderr
    wait_for(lambda: [w["labels"] for w in broker.workers_as(admin)] == [{"@pool:b": "1"}],
             20, "the worker to come back in pool b")

    async def scenario() -> None:
        async with Requester(broker.requester_url, token=a_app) as a:
            response = await a.request("echo", {"message": "x"})
            assert response.code == "no_workers", response

    asyncio.run(scenario())
    assert json.dumps(broker.workers_as(admin))  # still listed, once
