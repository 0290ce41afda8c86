"""The admin reads well and stays fast: live worker counts, readable durations, links
between workers and their requests, a request's timeline, bounded queries."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from dispatch.formats import duration, percent
from dispatch.control import services
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


@pytest.mark.parametrize("ms, text", [
    (1.3740062713623047, "1.37 ms"), (0.42, "0.42 ms"), (41.26, "41.3 ms"), (412.3, "412 ms"),
    (999.7, "1.0 s"), (2300, "2.3 s"), (245_000, "4 min 05 s"), (7_620_000, "2 h 07 min"),
    (-0.5, "-0.50 ms"), (None, "-"),
])
def test_durations_read_well(ms: float | None, text: str) -> None:
    assert duration(ms) == text


def test_shares_read_well() -> None:
    assert [percent(r) for r in (0.0, 0.004, 0.0412, 0.25, 1.0)] == \
        ["0%", "0.4%", "4.1%", "25%", "100%"]


def test_online_workers_show_live_counts_from_one_registry_read(
        admin_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    live = WorkerEntry("w-1", "w-1", "worker.1", frozenset({"echo"}), session_id="s-now",
                       completed=29, in_flight=3, latency_ms=1.3740062713623047,
                       latency_at=time.time(), error_rate=0.04)
    async_to_sync(get_registry().add)(live)
    session("w-1", "s-now")  # online, its stored count still 0
    WorkerSession.objects.create(session_id="s-before", worker_id="w-1", connected_at=NOW,
                                 last_seen=NOW, disconnected_at=NOW, requests_served=7,
                                 status=WorkerSession.Status.OFFLINE)
    session("w-2", "s-gone")  # "online" in its row, unknown to the registry
    reads = []
    real = services.workers_list

    async def counted() -> list[dict]:
        reads.append(1)
        return await real()

    monkeypatch.setattr(services, "workers_list", counted)
    page = admin_client.get("/admin/dispatch/workersession/").content.decode()
    assert len(reads) == 1
    assert page.count('?worker_id=w-1">29</a></td>') == 1
    assert page.count('?worker_id=w-1">7</a></td>') == 1
    assert '<td class="field-load">3/16</td>' in page
    assert "1.37 ms" in page and "4.0%" in page and "1.374006" not in page
    detail = admin_client.get(
        f"/admin/dispatch/workersession/{WorkerSession.objects.get(session_id='s-now').pk}"
        "/change/").content.decode()
    assert "29" in detail and "1.37 ms" in detail


def test_a_worker_links_to_its_requests_and_a_request_to_its_worker(admin_client: Client
                                                                    ) -> None:
    odd = 'w"<b>&1'  # worker ids come from peers
    session(odd, "s1")
    mine = RequestRecord.objects.create(request_id="r-mine", command="echo", worker_id=odd,
                                        success=True, started_at=NOW, finished_at=NOW)
    RequestRecord.objects.create(request_id="r-other", command="echo", worker_id="w2",
                                 success=True, started_at=NOW, finished_at=NOW)
    page = admin_client.get("/admin/dispatch/workersession/").content.decode()
    requests_url = "/admin/dispatch/requestrecord/?worker_id=w%22%3Cb%3E%261"
    assert f'<a href="{requests_url}">0</a>' in page and "<b>&" not in page  # served
    listed = admin_client.get(requests_url).content.decode()
    assert "r-mine" in listed and "r-other" not in listed

    detail = admin_client.get(f"/admin/dispatch/requestrecord/{mine.pk}/change/").content
    workers_url = "/admin/dispatch/workersession/?worker_id=w%22%3Cb%3E%261"
    assert f'<a href="{workers_url}">w&quot;&lt;b&gt;&amp;1</a>' in detail.decode()
    assert admin_client.get(workers_url).content.decode().count("field-worker_id") == 1


def test_a_request_page_reads_as_a_timeline(admin_client: Client) -> None:
    ms = timedelta(milliseconds=1)
    record = RequestRecord.objects.create(
        request_id="r1", command="train", worker_id="w2", success=False, attempts=2,
        workers_lost=1, code="timeout", error="Worker response timeout",
        latency_ms=12.7, started_at=NOW, placed_at=NOW + 0.42 * ms,
        finished_at=NOW + 12.7 * ms, routing="least_loaded: 1 of 2; w2 2",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    page = admin_client.get(f"/admin/dispatch/requestrecord/{record.pk}/change/"
                            ).content.decode()
    for text in ("submitted", "first placed on a worker", "+0.42 ms", "+12.3 ms",
                 "2 attempts, 1 worker(s) lost under it", "timeout", "12.7 ms",
                 "Worker response timeout", "least_loaded: 1 of 2; w2 2",
                 "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
        assert text in page, text
    assert 'answered by <a href="/admin/dispatch/workersession/?worker_id=w2">w2</a>' in page
    headings = [page.index(h) for h in ("Timeline", "Outcome", "How its worker was chosen")]
    assert headings == sorted(headings)

    never = RequestRecord.objects.create(request_id="r2", command="train", success=False,
                                         code="no_workers", started_at=NOW, finished_at=NOW)
    page = admin_client.get(f"/admin/dispatch/requestrecord/{never.pk}/change/"
                            ).content.decode()
    assert "never placed on a worker" in page and "answered: no_workers" in page


def test_the_request_list_issues_few_bounded_queries(admin_client: Client) -> None:
    """No query reads every row: no DISTINCT over the table (the filters list recent
    values), no date truncation (no date hierarchy), no substring search."""
    RequestRecord.objects.bulk_create(
        RequestRecord(request_id=f"r{i}", command=f"c{i % 7}", worker_id=f"w{i % 5}",
                      success=i % 10 != 0, code="" if i % 10 else "timeout",
                      latency_ms=i / 3, process=f"p{i % 2}", started_at=NOW,
                      finished_at=NOW - timedelta(seconds=i))
        for i in range(300))
    for query in ("", "?success__exact=0", "?command=c3", "?worker_id=w1", "?q=r17",
                  "?q=w2", "?code=timeout&p=2"):
        with CaptureQueriesContext(connection) as queries:
            page = admin_client.get(f"/admin/dispatch/requestrecord/{query}")
        assert page.status_code == 200, query
        assert len(queries) <= 10, (query, len(queries))
        for sql in (q["sql"] for q in queries.captured_queries):
            assert "DISTINCT" not in sql or "LIMIT" in sql, sql
            assert "LIKE" not in sql and "trunc" not in sql.lower(), sql
    page = admin_client.get("/admin/dispatch/requestrecord/").content.decode()
    assert ">c6</a>" in page and ">p1</a>" in page  # the filters list recent values
    assert admin_client.get("/admin/dispatch/requestrecord/?q=r17").content.decode() \
        .count("field-request_id") == 1


def test_the_job_list_shows_pending_work_and_cancels_it_through_the_broker(
        admin_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from dispatch.models import Job

    def job(key: str, state: str, restarts: int = 0) -> Job:
        return Job.objects.create(key=key, request_id=f"rid-{key}", owner="anonymous",
                                  command="train", state=state, request="{}",
                                  worker_id="gpu-1" if state != "queued" else "",
                                  restarts=restarts, created_at=NOW,
                                  deadline=NOW + timedelta(hours=1))

    rows = [job("k1", "running", restarts=2), job("k2", "queued"), job("k3", "done")]
    page = admin_client.get("/admin/dispatch/job/").content.decode()
    assert all(f"rid-{r.key}" in page for r in rows) and "gpu-1" in page
    cancelled: list[str] = []

    async def cancel(request_id: str, by: str) -> int:
        cancelled.append(request_id)
        assert by == "staff user 'admin' in the admin"  # its answer says who
        return 1

    monkeypatch.setattr(services, "cancel", cancel)
    response = admin_client.post("/admin/dispatch/job/", {
        "action": "cancel", "_selected_action": [r.pk for r in rows]}, follow=True)
    assert sorted(cancelled) == ["rid-k1", "rid-k2"]  # not the answered one
    assert "Cancelled: rid-k1, rid-k2" in response.content.decode()
