"""Credentials: protected mode, tokens per socket, API key limits, revocation, origins."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from dispatch import registry as registry_module
from dispatch.auth import create_credential, digest, get_guard, stop_guard
from dispatch.core.dispatcher import stop_dispatcher
from dispatch.models import Credential
from dispatch.transport.routing import SocketRouter
from tests.procs import ROOT, WorkerProc, wait_for
from workers.protocol import Message, Registration
from workers.requester import Requester

pytestmark = [pytest.mark.timeout(60)]

app = SocketRouter()
REMOTE = "203.0.113.7"  # a documentation address: only ever put in a test scope


@pytest.fixture
async def broker_state(async_db: None) -> AsyncIterator[None]:
    registry_module.reset_registry()
    with override_settings(BROKER={"HISTORY": False, "ALLOWED_ORIGINS": "https://ops.example"}):
        yield
        await stop_dispatcher()
        await stop_guard()
    registry_module.reset_registry()


async def credential(name: str, kind: str, **options) -> str:
    _, token = await database_sync_to_async(create_credential)(name, kind, **options)
    await (await get_guard()).refresh()
    return token


async def open_socket(path: str, *, client: str = "127.0.0.1", token: str | None = None,
                      query: str = "", origin: str | None = None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    if origin:
        headers.append((b"origin", origin.encode()))
    comm = WebsocketCommunicator(app, path + query, headers=headers)
    comm.scope["client"] = (client, 40000)
    connected, _ = await comm.connect(timeout=3)
    assert connected  # refusals are accepted first, so the reason can be sent
    return comm


async def refused(comm: WebsocketCommunicator) -> tuple[str, int]:
    """The reason sent to a refused peer, and the close code that followed."""
    text = await comm.receive_from(3)
    close = await comm.receive_output(3)
    assert close["type"] == "websocket.close"
    body = json.loads(text)  # an error frame (worker socket) or an error answer
    return (body["data"] if "type" in body else body)["error"], close["code"]


async def register(comm: WebsocketCommunicator) -> Message:
    await comm.send_to(text_data=Message("connect", Registration("w1", "w1", ["echo"]).to_data())
                       .to_json())
    return Message.from_json(await comm.receive_from(3))


async def test_protected_mode_admits_loopback_and_refuses_remote_peers(broker_state) -> None:
    local = await open_socket("/ws/worker/")
    assert (await register(local)).type == "connect"
    remote = await open_socket("/ws/worker/", client=REMOTE)
    reason, code = await refused(remote)
    assert code == 4403 and "python manage.py token create worker" in reason


async def test_once_credentials_exist_every_peer_needs_one(broker_state) -> None:
    worker_token = await credential("fleet", "worker")
    for client in ("127.0.0.1", REMOTE):
        reason, code = await refused(await open_socket("/ws/worker/", client=client))
        assert code == 4401 and "Authorization: Bearer" in reason
    bad = await open_socket("/ws/worker/", token=worker_token[:-2] + "xx")
    assert (await refused(bad)) == ("Invalid or revoked token", 4401)
    ok = await open_socket("/ws/worker/", client=REMOTE, token=worker_token)
    assert (await register(ok)).type == "connect"
    via_query = await open_socket("/ws/requester/", query=f"?token={worker_token}")
    reason, code = await refused(via_query)  # a worker token is no API key
    assert code == 4403 and "worker credential cannot be used on the requester socket" in reason


async def test_api_key_limited_to_commands(broker_state) -> None:
    key = await credential("billing", "requester", commands=["echo"])
    await credential("fleet", "worker")
    requester = await open_socket("/ws/requester/", token=key)
    await requester.send_json_to({"request_id": "1", "command": "calculate", "data": {}})
    answer = await requester.receive_json_from(3)
    assert answer["error"] == "Command 'calculate' is not allowed for this API key"
    await requester.send_json_to({"request_id": "2", "command": "echo", "data": {}})
    assert (await requester.receive_json_from(3))["error"] == "No available workers"


async def test_connections_per_key_are_limited(broker_state) -> None:
    key = await credential("one-at-a-time", "requester", max_connections=1)
    first = await open_socket("/ws/requester/", token=key)
    reason, code = await refused(await open_socket("/ws/requester/", token=key))
    assert code == 4429 and "limit 1" in reason
    await first.disconnect()
    await open_socket("/ws/requester/", token=key)  # the slot is free again


async def test_revoking_closes_live_connections(broker_state) -> None:
    key = await credential("temp", "requester")
    live = await open_socket("/ws/requester/", token=key)
    await database_sync_to_async(Credential.objects.filter(name="temp").update)(active=False)
    await (await get_guard()).refresh()  # the broker does this every AUTH_REFRESH_SECONDS
    assert (await refused(live)) == ("Credential revoked", 4401)


async def test_browser_origins_are_checked_on_the_requester_socket(broker_state) -> None:
    evil = await open_socket("/ws/requester/", origin="https://evil.example")
    reason, code = await refused(evil)
    assert code == 4403 and "Origin not allowed" in reason
    ops = await open_socket("/ws/requester/", origin="https://ops.example")
    await ops.send_json_to({"command": "echo"})
    assert (await ops.receive_json_from(3))["error"] == "No available workers"


async def test_tokens_are_stored_hashed(broker_state) -> None:
    token = await credential("hashed", "worker")
    row = await database_sync_to_async(Credential.objects.get)(name="hashed")
    assert row.digest == digest(token) and token not in (row.digest, row.key_id)
    assert row.key_id in token


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_real_broker_with_credentials(broker_factory, tmp_path: Path) -> None:
    """Tokens made with the management command, used by the real worker and requester."""
    broker = broker_factory(env={"BROKER_AUTH_REFRESH_SECONDS": "0.3"})
    worker_token, api_key, admin_key = broker.tokens(
        ["create", "worker", "fleet"], ["create", "requester", "app"], ["create", "admin", "ops"])
    broker.wait_credentials(admin_key)  # the broker reloads credentials every 0.3 s
    anonymous = WorkerProc(broker, "anonymous").start()
    worker = WorkerProc(broker, "trusted", ["--token", worker_token]).start()
    try:
        wait_for(lambda: [w["name"] for w in broker.workers_as(admin_key)] == ["trusted"], 15,
                 "only the worker with a token to register")
        wait_for(lambda: "Missing credentials" in anonymous.log(), 10,
                 "the anonymous worker to be told why it was refused")
        answer = subprocess.run(
            [sys.executable, "-m", "workers.requester", "127.0.0.1",  # flags anywhere
             str(broker.requester_port), "--token", api_key, "echo", '{"message": "signed"}'],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0 and "Echo: signed" in answer.stdout

        def requesters() -> set[str]:
            import sqlite3

            with sqlite3.connect(broker.db_path) as db:
                return {r for (r,) in db.execute("SELECT requester FROM dispatch_requestrecord")}

        wait_for(lambda: any(r.startswith("app@127.0.0.1:") for r in requesters()), 10,
                 "the history to name the credential that sent it")
        denied, allowed = broker.manage_many(["workers"], ["workers", "--token", admin_key])
        assert denied.returncode != 0 and "Forbidden" in denied.stderr
        assert allowed.returncode == 0 and "trusted" in allowed.stdout

        async def revoke_while_connected() -> float:
            async with Requester(broker.requester_url, token=api_key) as r:
                assert await r.call("echo", message="x") == "Echo: x"
                revoked = await asyncio.to_thread(broker.manage, "token", "revoke", "app")
                assert revoked.returncode == 0
                started = time.monotonic()
                from workers.errors import ConnectionLost

                with pytest.raises(ConnectionLost, match="Credential revoked"):  # it says why
                    for _ in range(100):
                        await r.call("echo", message="y")
                        await asyncio.sleep(0.1)
                return time.monotonic() - started

        assert asyncio.run(revoke_while_connected()) < 5
    finally:
        anonymous.stop(signal.SIGKILL)
        worker.stop(signal.SIGKILL)


def test_who_counts_as_a_local_peer() -> None:
    from dispatch.auth import peer_of

    assert peer_of(("127.0.0.1", 1), []).local and peer_of(("::1", 1), []).local
    assert peer_of(("::ffff:127.0.0.1", 1), []).local  # a dual-stack listener's IPv4 peer
    assert not peer_of((REMOTE, 1), []).local
    assert not peer_of(("127.0.0.1", 1), [(b"x-forwarded-for", b"198.51.100.1")]).local
    assert not peer_of(("127.0.0.1", 1), [(b"forwarded", b"for=198.51.100.1")]).local
    with override_settings(BROKER={"TRUSTED_PROXIES": "127.0.0.0/8"}):
        behind = peer_of(("127.0.0.1", 1), [(b"x-forwarded-for", b"198.51.100.1, 127.0.0.2")])
        assert (behind.host, behind.local) == ("198.51.100.1", False)
        assert peer_of(("127.0.0.1", 1), [(b"x-forwarded-for", b"127.0.0.1")]).local
