"""OpenTelemetry, when it is installed and configured; nothing at all otherwise.

A request's W3C ``traceparent`` travels in the protocol whether or not anyone
traces (requester -> broker -> worker, and back in the answer). With the
``opentelemetry-api`` package installed and a tracer provider set up (the SDK, an
exporter), the requester client sends the current span's context, the broker
records a span per request (a child of the requester's), and passes the worker
that span's context, so a trace shows requester, broker and worker in one tree.
Without a configured provider every function here is a cheap no-op.
"""

from __future__ import annotations

import time
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional package is absent: tracing is off
    trace = None  # type: ignore[assignment]

_propagator = TraceContextTextMapPropagator() if trace is not None else None


_checked = (-1.0, False)  # (monotonic time, answer): asked at most once a second


def enabled() -> bool:
    """A tracer provider is configured (the API alone only has its no-op proxy).

    Asked on every request, so the answer is kept for a second: a provider set up
    after start is noticed within a second."""
    global _checked
    if trace is None:
        return False
    now = time.monotonic()
    if now - _checked[0] > 1.0:
        _checked = (now, not isinstance(trace.get_tracer_provider(),
                                        (trace.ProxyTracerProvider, trace.NoOpTracerProvider)))
    return _checked[1]


def current_traceparent() -> str | None:
    """The running span's context as a ``traceparent``, if there is a span."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)  # type: ignore[union-attr]
    return carrier.get("traceparent")


def start_span(name: str, traceparent: str | None, kind: str = "SERVER",
               **attributes: Any) -> tuple[Any, str | None]:
    """A span named ``name``, child of ``traceparent``; and the traceparent to pass on
    (the new span's, or the one given when tracing is off)."""
    if not enabled():
        return None, traceparent
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    span = trace.get_tracer("dispatch").start_span(  # type: ignore[union-attr]
        name, context=parent, kind=getattr(trace.SpanKind, kind),
        attributes={k: v for k, v in attributes.items() if v is not None})
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))  # type: ignore
    return span, carrier.get("traceparent", traceparent)


def end_span(span: Any, success: bool, code: str | None = None, **attributes: Any) -> None:
    """End a span of :func:`start_span` with the outcome (None: tracing is off)."""
    if span is None:
        return
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)
    if not success:
        span.set_status(trace.Status(trace.StatusCode.ERROR, code or "error"))  # type: ignore
    span.end()
