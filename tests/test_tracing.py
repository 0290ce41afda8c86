"""W3C trace context: from the requester to the worker and back, into history and logs;
OpenTelemetry spans when the SDK is configured."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from tests.procs import ROOT, Broker, wait_for
from workers.protocol import ApiRequest, Message, RequestBody, parse_traceparent
from workers.requester import Requester, Route

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
HANDLERS = ("--handlers", "tests.sample_handlers")


@pytest.mark.parametrize("text, kept", [
    (TRACE, TRACE),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", TRACE.replace("00", "01", 1)),
    (TRACE + "-more", None),  # version 00 has exactly four fields
    ("ff" + TRACE[2:], None),
    ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None),
    (TRACE.upper(), None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None),
    ("\x1b[31m" + TRACE, None), (42, None), (None, None),
])
def test_only_well_formed_trace_contexts_are_kept(text: object, kept: str | None) -> None:
    assert parse_traceparent(text) == kept


def test_the_trace_context_travels_in_both_frames() -> None:
    request = ApiRequest.from_json(json.dumps({"command": "x", "traceparent": TRACE}))
    assert request.traceparent == TRACE
    assert ApiRequest.from_json(request.to_json()).traceparent == TRACE
    assert ApiRequest.from_json('{"command": "x", "traceparent": "junk"}').traceparent is None
    frame = Message.from_json(Message.request("x", {}, traceparent=TRACE).to_json())
    assert RequestBody.from_message(frame).traceparent == TRACE
    assert "traceparent" not in Message.request("x", {}).data  # absent stays absent


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_trace_context_reaches_the_worker_the_answer_and_history(
        broker: Broker, spawn_worker) -> None:
    spawn_worker("tracer", *HANDLERS)
    async with Requester(broker.requester_url) as requester:
        traced = await requester.request("trace_seen", route=Route(traceparent=TRACE))
        junk = await requester.request("trace_seen", route=Route(traceparent="not-a-trace"))
        plain = await requester.request("trace_seen")
    assert traced.success and traced.data == TRACE  # what the handler's ctx held
    assert traced.route == {"traceparent": TRACE}
    assert junk.success and junk.data is None and junk.route is None
    assert plain.data is None
    call = urllib.request.Request(  # the control API takes the standard HTTP header
        broker.http_url + "/api/call", data=json.dumps({"command": "trace_seen"}).encode(),
        headers={"Content-Type": "application/json", "traceparent": TRACE})
    with urllib.request.urlopen(call, timeout=10) as resp:
        assert json.load(resp)["data"] == TRACE

    def rows() -> list[tuple]:
        with sqlite3.connect(broker.workdir / "broker.sqlite3") as db:
            return db.execute("SELECT request_id, traceparent, placed_at >= started_at "
                              "FROM dispatch_requestrecord ORDER BY id").fetchall()

    wait_for(lambda: len(rows()) == 4, 10, "four history rows")
    by_id = {r[0]: r[1:] for r in rows()}
    assert by_id[traced.request_id] == (TRACE, 1)
    assert by_id[plain.request_id] == ("", 1)


def test_with_opentelemetry_the_broker_span_is_a_child_of_the_requesters() -> None:
    """In a fresh interpreter: a tracer provider is process-wide and set only once."""
    script = textwrap.dedent(f"""
        import time
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from workers import tracing

        assert tracing.start_span("off", "{TRACE}") == (None, "{TRACE}")
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        time.sleep(1.1)  # noticed within a second
        span, passed_on = tracing.start_span("dispatch echo", "{TRACE}", command="echo")
        tracing.end_span(span, False, "timeout", worker_id="w1")
        with trace.get_tracer("t").start_as_current_span("caller"):
            current = tracing.current_traceparent()
        [done] = [s for s in exporter.get_finished_spans() if s.name == "dispatch echo"]
        ctx = done.get_span_context()
        print(passed_on, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"),
              format(done.parent.span_id, "016x"), done.status.status_code.name,
              done.attributes["worker_id"], current is not None)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    passed_on, trace_id, span_id, parent, status, worker, current = out.stdout.split()
    assert trace_id == TRACE.split("-")[1] and parent == TRACE.split("-")[2]
    assert passed_on == f"00-{trace_id}-{span_id}-01"  # the worker is told the broker's span
    assert (status, worker, current) == ("ERROR", "w1", "True")
