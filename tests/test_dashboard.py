"""The dashboard socket through Channels' WebsocketCommunicator: who may watch, what a
refused or revoked peer still gets (nothing), and the operator actions.

The page itself, in a real browser against a real broker: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from dispatch import registry as registry_module
from dispatch.auth import create_credential, get_guard, stop_guard
from dispatch.core.dispatcher import stop_dispatcher
from dispatch.models import Credential
from dispatch.registry import WorkerEntry, get_registry
from dispatch.transport import dashboard
from dispatch.transport.routing import SocketRouter

pytestmark = [pytest.mark.timeout(30)]

app = SocketRouter()


@pytest.fixture
async def broker_state(async_db: None) -> AsyncIterator[None]:
    registry_module.reset_registry()
    # The sockets waiting to log in are the process's: one a test left behind (its
    # communicator cancelled before it left the list) would be the next test's oldest.
    dashboard.DashboardSocket.waiting.clear()
    with override_settings(BROKER={"HISTORY": False}, ALLOWED_HOSTS=["broker.test"]):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()
    dashboard.DashboardSocket.waiting.clear()


async def open_dashboard(*, client: str = "127.0.0.1", origin: str | None = None,
                         host: str = "broker.test:8000") -> WebsocketCommunicator:
    headers = [(b"host", host.encode())]
    if origin:
        headers.append((b"origin", origin.encode()))
    comm = WebsocketCommunicator(app, "/ws/dashboard/", headers=headers)
    comm.scope["client"] = (client, 40000)
    connected, _ = await comm.connect(timeout=3)
    assert connected
    return comm


async def admin_key(name: str = "ops") -> str:
    _, token = await database_sync_to_async(create_credential)(name, "admin")
    await (await get_guard()).refresh()
    return token


async def closed_with(comm: WebsocketCommunicator) -> tuple[list[dict[str, Any]], int]:
    """The frames sent before the close, and its code."""
    frames = []
    while True:
        out = await comm.receive_output(3)
        if out["type"] == "websocket.close":
            return frames, out["code"]
        frames.append(json.loads(out["text"]))


async def test_protected_mode_shows_the_fleet_to_a_loopback_peer(broker_state) -> None:
    await get_registry().add(WorkerEntry("w1", "gpu-box", "worker.s1", frozenset({"echo"}),
                                         labels={"gpu": "a100"}))
    comm = await open_dashboard()
    snap = await comm.receive_json_from(3)
    assert snap["type"] == "snapshot"
    assert [(w["name"], w["labels"], w["state"]) for w in snap["workers"]] == \
        [("gpu-box", {"gpu": "a100"}, "online")]
    assert snap["commands"][0]["command"] == "echo" and snap["commands"][0]["workers"] == 1
    assert len(snap["series"]) == 300
    await comm.disconnect()


async def test_a_remote_peer_without_a_credential_gets_no_data(broker_state) -> None:
    comm = await open_dashboard(client="203.0.113.7")
    assert await comm.receive_json_from(3) == {"type": "auth_required"}
    await comm.send_json_to({"type": "drain", "worker_id": "w1"})  # acts before auth
    frames, code = await closed_with(comm)
    assert code == 4401 and [f["type"] for f in frames] == ["error"]


async def test_a_socket_that_never_logs_in_is_closed(broker_state, monkeypatch) -> None:
    monkeypatch.setattr(dashboard, "AUTH_SECONDS", 0.2)
    comm = await open_dashboard(client="203.0.113.7")
    frames, code = await closed_with(comm)
    assert code == 4401 and [f["type"] for f in frames] == ["auth_required", "error"]
    assert not dashboard.DashboardSocket.waiting


async def test_one_peer_cannot_take_every_place_waiting_to_log_in(broker_state,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr(dashboard, "MAX_UNAUTHENTICATED_PER_PEER", 3)
    waiting = [await open_dashboard(client="203.0.113.7") for _ in range(3)]
    for comm in waiting:
        assert await comm.receive_json_from(3) == {"type": "auth_required"}
    frames, code = await closed_with(await open_dashboard(client="203.0.113.7"))
    assert code == 4429 and frames[0]["code"] == "limit_exceeded"
    other = await open_dashboard(client="198.51.100.9")  # another peer still gets a place
    assert await other.receive_json_from(3) == {"type": "auth_required"}
    await waiting[0].disconnect()  # a place frees
    again = await open_dashboard(client="203.0.113.7")
    assert await again.receive_json_from(3) == {"type": "auth_required"}
    for comm in (*waiting[1:], other, again):
        await comm.disconnect()


async def test_a_flood_from_many_addresses_makes_the_oldest_waiting_socket_go(
        broker_state, monkeypatch) -> None:
    monkeypatch.setattr(dashboard, "MAX_UNAUTHENTICATED", 3)
    flood = []
    for i in range(3):  # one after the other: a socket joins the list when it is asked
        comm = await open_dashboard(client=f"203.0.113.{i}")
        assert await comm.receive_json_from(3) == {"type": "auth_required"}
        flood.append(comm)
    operator = await open_dashboard(client="198.51.100.9")
    assert await operator.receive_json_from(3) == {"type": "auth_required"}
    frames, code = await closed_with(flood[0])  # the longest-waiting one made room
    assert code == 4429 and frames[-1]["code"] == "limit_exceeded"
    for comm in (*flood[1:], operator):
        await comm.disconnect()


async def test_logging_out_closes_an_open_dashboard(broker_state, monkeypatch) -> None:
    from django.contrib.auth.models import User
    from django.contrib.sessions.models import Session
    from django.test import Client

    monkeypatch.setattr(dashboard, "RECHECK_SECONDS", 0.0)
    await admin_key()  # protected mode ends: only the session admits it

    def login() -> str:
        client = Client()
        client.force_login(User.objects.create_user("boss", is_staff=True))
        return client.cookies["sessionid"].value

    session = await database_sync_to_async(login)()
    comm = WebsocketCommunicator(app, "/ws/dashboard/", headers=[
        (b"host", b"broker.test:8000"), (b"cookie", f"sessionid={session}".encode())])
    assert (await comm.connect(timeout=3))[0]
    assert (await comm.receive_json_from(3))["type"] == "snapshot"
    await database_sync_to_async(Session.objects.filter(session_key=session).delete)()
    frames, code = await closed_with(comm)  # what /admin/logout/ does to the session
    assert code == 4401 and frames[-1]["type"] == "error"


async def test_an_admin_key_admits_and_a_wrong_one_does_not(broker_state) -> None:
    key = await admin_key()
    wrong = await open_dashboard()  # loopback, but protected mode ended with the key
    assert await wrong.receive_json_from(3) == {"type": "auth_required"}
    await wrong.send_json_to({"type": "auth", "key": key + "x"})
    frames, code = await closed_with(wrong)
    assert code == 4401 and not any(f["type"] == "snapshot" for f in frames)
    assert frames[-1]["error"] == "Invalid key: not an admin key of this broker"

    right = await open_dashboard()
    await right.receive_json_from(3)
    await right.send_json_to({"type": "auth", "key": key})
    assert (await right.receive_json_from(3))["type"] == "snapshot"
    await right.disconnect()


async def test_revoking_the_key_closes_an_open_dashboard(broker_state, monkeypatch) -> None:
    monkeypatch.setattr(dashboard, "RECHECK_SECONDS", 0.0)
    key = await admin_key()
    comm = await open_dashboard()
    await comm.receive_json_from(3)
    await comm.send_json_to({"type": "auth", "key": key})
    assert (await comm.receive_json_from(3))["type"] == "snapshot"
    await database_sync_to_async(Credential.objects.filter(name="ops").update)(active=False)
    await (await get_guard()).refresh()
    frames, code = await closed_with(comm)  # within a push or two
    assert code == 4401
    assert frames[-1]["type"] == "error" and "no longer" in frames[-1]["error"]


async def test_a_page_of_another_site_is_refused_before_any_data(broker_state) -> None:
    comm = await open_dashboard(origin="https://evil.example")
    frames, code = await closed_with(comm)
    assert code == 4403 and [f["type"] for f in frames] == ["error"]
    # DNS rebinding: a name of the attacker's resolved to the broker; page and Host agree
    rebound = await open_dashboard(origin="http://evil.example:8000", host="evil.example:8000")
    _, code = await closed_with(rebound)
    assert code == 4403
    own = await open_dashboard(origin="http://broker.test:8000")
    assert (await own.receive_json_from(3))["type"] == "snapshot"
    await own.disconnect()


async def test_no_dashboard_on_the_ports_that_face_the_fleet(broker_state) -> None:
    from dispatch import conf

    for port in (conf.get("WORKER_PORT"), conf.get("REQUESTER_PORT")):
        comm = WebsocketCommunicator(app, "/ws/dashboard/", headers=[(b"host", b"broker.test")])
        comm.scope["server"] = ("127.0.0.1", port)
        assert await comm.connect(timeout=3) == (False, 4404)


async def test_drain_undrain_and_bad_actions(broker_state) -> None:
    registry = get_registry()
    await registry.add(WorkerEntry("w1", "box", "worker.s1", frozenset({"echo"})))
    comm = await open_dashboard()
    await comm.receive_json_from(3)

    async def act(frame: dict[str, Any]) -> dict[str, Any]:
        await comm.send_json_to(frame)
        while True:
            reply = await comm.receive_json_from(3)
            if reply["type"] != "snapshot":
                return reply

    assert (await act({"type": "drain", "worker_id": "w1"}))["message"] == "Draining: w1"
    assert (await registry.get("w1")).draining
    assert "Back in rotation" in (await act({"type": "undrain", "worker_id": "w1"}))["message"]
    assert not (await registry.get("w1")).draining
    assert "No worker" in (await act({"type": "drain", "worker_id": "nobody"}))["message"]
    assert "No request" in (await act({"type": "cancel", "request_id": "r-1"}))["message"]
    assert (await act({"type": "reboot"}))["code"] == "bad_request"
    assert (await act({"type": "drain", "worker_id": 7}))["code"] == "bad_request"
    await comm.send_to(text_data="{not json")
    assert (await comm.receive_json_from(3))["type"] in ("error", "snapshot")
    await comm.disconnect()
