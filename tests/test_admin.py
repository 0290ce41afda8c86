"""The admin shows what routing decided: a worker's live state, a request's routing."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from dispatch.models import RequestRecord, WorkerSession
from dispatch.registry import WorkerEntry, get_registry, reset_registry

pytestmark = pytest.mark.django_db

NOW = datetime.now(timezone.utc)


@pytest.fixture(autouse=True)
def fresh_registry() -> None:
    reset_registry()
    yield
    reset_registry()


def session(worker_id: str, session_id: str) -> WorkerSession:
    return WorkerSession.objects.create(session_id=session_id, worker_id=worker_id,
                                        name=worker_id, connected_at=NOW, last_seen=NOW)


def test_the_worker_list_shows_each_online_workers_routing_state(admin_client: Client
                                                                 ) -> None:
    registry = get_registry()
    out = WorkerEntry("w-out", "w-out", "worker.1", frozenset({"echo"}), session_id="s1")
    out.eject(time.time(), "5 infrastructure failure(s) in a row")
    async_to_sync(registry.add)(out)
    async_to_sync(registry.add)(WorkerEntry("w-ok", "w-ok", "worker.2", frozenset({"echo"}),
                                            session_id="s2"))
    session("w-out", "s1")
    session("w-ok", "s2")
    page = admin_client.get("/admin/dispatch/workersession/").content.decode()
    assert "ejected until" in page and "(5 infrastructure failure(s) in a row)" in page
    assert ">online<" in page


def test_the_request_page_shows_how_its_worker_was_chosen(admin_client: Client) -> None:
    record = RequestRecord.objects.create(
        request_id="r1", command="echo", worker_id="w2", success=True, attempts=2,
        started_at=NOW, finished_at=NOW,
        routing="least_loaded: 2 of 3; 1 draining; w1 1.2 vs 3.4 | least_loaded: 1 of 2; w2 2")
    page = admin_client.get(f"/admin/dispatch/requestrecord/{record.pk}/change/")
    assert page.status_code == 200
    assert "least_loaded: 2 of 3; 1 draining; w1 1.2 vs 3.4 | least_loaded: 1 of 2; w2 2" in \
        page.content.decode()
