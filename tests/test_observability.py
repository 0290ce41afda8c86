"""Watching the broker: /metrics after real traffic, /readyz when it cannot route.

A real broker, a real worker process, real sockets; the metrics text is parsed
with prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from django.test import override_settings

from dispatch.core.dispatcher import get_dispatcher, stop_dispatcher
from dispatch.core.metering import MAX_COMMANDS, OTHER, Histogram, Meter
from tests.procs import Broker, until, wait_for
from workers.requester import Requester

HANDLERS = ("--handlers", "tests.sample_handlers")


def scrape(broker: Broker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(broker.http_url + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ready(broker: Broker) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(broker.http_url + "/readyz", timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_metrics_count_what_was_sent(broker: Broker, spawn_worker) -> None:
    spawn_worker("m1", *HANDLERS)
    async with Requester(broker.requester_url) as requester:
        answers = await asyncio.gather(
            *(requester.request("echo", {"message": f"{i}"}) for i in range(7)),
            *(requester.request("explode", {}) for _ in range(2)),
            *(requester.request("no_such_command", {}) for _ in range(3)))
    assert [a.success for a in answers] == [True] * 7 + [False] * 5
    async with websockets.connect(broker.requester_url) as raw:  # one malformed frame
        await raw.send("{not json")
        assert json.loads(await raw.recv())["code"] == "bad_request"
    async with websockets.connect(broker.worker_url) as raw:  # a worker that never registers
        await raw.send(json.dumps({"type": "connect", "data": {"worker_id": 7}}))
        await asyncio.wait_for(raw.wait_closed(), 10)

    samples = scrape(broker)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("broker_requests_total", command="echo", outcome="ok") == 7
    explode = {k[1]: v for k, v in samples.items()
               if k[0] == "broker_requests_total" and ("command", "explode") in k[1]}
    assert sum(explode.values()) == 2 and not any(("outcome", "ok") in k for k in explode)
    # a name no worker offers gets no series of its own (made-up names would crowd out
    # the real ones)
    assert value("broker_requests_total", command="(other)", outcome="no_workers") == 3
    assert value("broker_request_duration_seconds_count", command="echo") == 7
    assert value("broker_request_duration_seconds_bucket", command="echo", le="+Inf") == 7
    assert value("broker_request_duration_seconds_sum", command="echo") > 0
    assert value("broker_frames_refused_total", socket="requester", reason="bad_request") == 1
    assert value("broker_frames_refused_total", socket="worker", reason="bad_request") == 1
    assert value("broker_connections_closed_total", socket="worker",
                 reason="bad_registration") == 1
    assert value("broker_workers", state="online") == 1
    assert value("broker_requests_pending") == 0
    assert value("broker_registry_up") == 1
    assert value("process_resident_memory_bytes") > 0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_metrics_need_the_api_credential_once_there_is_one(broker_factory) -> None:
    broker = broker_factory(env={"BROKER_API_TOKEN": "s3cret-token-for-tests"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(broker.http_url + "/metrics", timeout=5)
    assert refused.value.code == 403
    request = urllib.request.Request(broker.http_url + "/metrics", headers={
        "Authorization": "Bearer s3cret-token-for-tests"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert b"broker_requests_pending" in resp.read()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_fleets_ports_answer_the_probes_and_nothing_else(shared_broker: Broker) -> None:
    broker = shared_broker
    for port in (broker.worker_port, broker.requester_port):
        base = f"http://{broker.host}:{port}"
        for path in ("/admin/login/", "/dashboard/", "/api/workers", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + path, timeout=5)
            assert refused.value.code == 404, path
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert json.load(resp)["status"] == "ok"
        with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
            assert json.load(resp)["status"] == "ready"
        probe = urllib.request.Request(base + "/healthz", method="HEAD")  # as some LBs do
        with urllib.request.urlopen(probe, timeout=5) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(broker.http_url + "/admin/login/", timeout=5) as resp:
        assert resp.status == 200


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_readyz_fails_with_the_reason_while_redis_is_down(broker_factory, redis_server) -> None:
    broker = broker_factory(env={"REDIS_URL": redis_server.url})
    assert ready(broker) == (200, {"status": "ready"})
    redis_server.stop()
    status, body = ready(broker)
    assert status == 503, body
    assert body["status"] == "unavailable"
    assert "channel layer" in body["reason"] or "registry" in body["reason"]
    assert broker.get("/healthz")["status"] == "ok"  # alive, just not able to route
    redis_server.start()
    wait_for(lambda: ready(broker)[0] == 200, 30, "ready again after Redis is back")


@pytest.mark.usefixtures("async_db")
async def test_readyz_fails_when_the_dispatchers_inbox_stalls() -> None:
    """The stalled-consumer case: sockets are accepted, but nothing reads the inbox."""
    with override_settings(BROKER={"HISTORY": False}):
        dispatcher = await get_dispatcher()
        try:
            assert await dispatcher.unready(1.0) is None
            inbox = next(t for t in dispatcher._tasks if t.get_name() == "dispatch-inbox")
            inbox.cancel()
            await until(inbox.done, 5, "the inbox task to stop")
            reason = await dispatcher.unready(0.3)
            assert reason is not None and "not handled" in reason
        finally:
            await stop_dispatcher()


def test_histogram_quantiles_interpolate_within_a_bucket() -> None:
    h = Histogram()
    for ms in [3.0] * 50 + [40.0] * 49 + [4000.0]:
        h.observe(ms)
    assert 2.5 <= h.quantile(0.5) <= 5  # type: ignore[operator]
    assert 25 <= h.quantile(0.99) <= 50  # type: ignore[operator]
    assert h.quantile(1.0) > 2500  # type: ignore[operator]
    assert Histogram().quantile(0.5) is None


def test_made_up_command_names_cannot_grow_the_meter() -> None:
    meter = Meter()
    for i in range(5000):
        meter.answered(f"made-up-{i}", False, "no_workers", 1.0)
    meter.answered("real", True, None, 1.0)
    assert set(meter.commands) == {OTHER, "real"}
    for i in range(MAX_COMMANDS + 500):
        meter.answered(f"cmd-{i}", False, "timeout", 1.0)
    assert len(meter.commands) == MAX_COMMANDS  # (other) and "real" among them
    assert meter.commands[OTHER].outcomes["timeout"] == 500 + 2


def test_the_window_has_one_row_per_second_quiet_ones_zero() -> None:
    now = [1000.2]
    meter = Meter(clock=lambda: now[0])
    meter.answered("a", True, None, 2.0)
    now[0] = 1002.5
    meter.answered("a", False, "timeout", 30000.0, error="Timeout", request_id="r1")
    rows = meter.window(5)
    assert [r["t"] for r in rows] == [998, 999, 1000, 1001, 1002]
    assert [r["answered"] for r in rows] == [0, 0, 1, 0, 1]
    assert [r["failed"] for r in rows] == [0, 0, 0, 0, 1]
    assert meter.failures[-1].code == "timeout" and meter.failures[-1].request_id == "r1"


def test_a_commands_failures_say_whether_a_worker_ran_it() -> None:
    """The dashboard's two columns: a worker ran it and it failed, or the broker answered
    without a worker's result (its workers' error rates do not move for those)."""
    meter = Meter()
    for code in ("command_error", "handler_failed", "no_workers", "timeout", "cancelled"):
        meter.answered("resize", False, code, 1.0)
    meter.answered("resize", True, None, 1.0)
    row = meter.command_summary()["resize"]
    assert (row["answered"], row["failed"], row["errors"], row["unserved"]) == (6, 5, 2, 3)


def test_recent_failures_alike_are_one_row_with_a_count_newest_first() -> None:
    from dispatch.control.fleetview import MAX_FAILURES, failure_groups

    now = [1000.0]
    meter = Meter(clock=lambda: now[0])
    for i in range(30):  # a burst of one fault, from two workers
        now[0] += 0.1
        meter.answered("resize", False, "handler_failed", 1.0, error="boom",
                       worker_id=f"w{i % 2}", request_id=f"r{i}")
    now[0] += 5
    meter.answered("get_time", False, "timeout", 1.0, error="late", request_id="t1")
    groups = failure_groups(meter.failures, now[0] + 2)
    assert [(g["command"], g["count"], g["ago"]) for g in groups] == [
        ("get_time", 1, 2.0), ("resize", 30, 7.0)]
    assert groups[1]["request_id"] == "r29" and groups[1]["workers"] == ["w1", "w0"]
    for i in range(MAX_FAILURES + 5):  # many kinds: the newest are kept
        meter.answered("c", False, "command_error", 1.0, error=f"e{i}")
    groups = failure_groups(meter.failures, now[0])
    assert len(groups) == MAX_FAILURES and groups[0]["error"] == f"e{MAX_FAILURES + 4}"
