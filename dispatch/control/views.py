"""HTTP edge: health check and the control API that management commands use.

The API needs ``Authorization: Bearer <admin key>`` (or ``API_TOKEN``), or a staff
session with Django's CSRF token; in protected mode (no credentials yet) direct
loopback peers need nothing, so the embedded default works on one machine with
no set-up. Whatever the credential, a browser page of another origin is refused
(its ``Origin`` is not the broker's own nor listed in ``ALLOWED_ORIGINS``), and a
POST must be ``application/json``: a form or ``text/plain`` body, which a page of
any site can send without asking, is never read.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Awaitable, Callable

import orjson
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST, require_safe
from prometheus_client import CONTENT_TYPE_LATEST

from workers import protocol

from ..auth import Peer, get_guard, origin_listed, peer_of
from ..core.dispatcher import get_dispatcher
from ..errors import DispatchError
from ..registry import get_registry
from . import metrics, services

View = Callable[..., Awaitable[HttpResponse]]
FORBIDDEN = ("Forbidden: the control API needs a staff login or 'Authorization: Bearer "
             "<admin key>' (python manage.py token create admin NAME)")


class BadRequest(ValueError):
    """The body of an API call is not what the endpoint takes."""


def _same_origin(request: HttpRequest, origin: str) -> bool:
    """The page is the broker's own (its host already passed ALLOWED_HOSTS)."""
    return origin == f"{request.scheme}://{request.get_host()}"


def _csrf_refused(request: HttpRequest) -> bool:
    """Django's CSRF check, for requests authenticated by a session cookie."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {}) is not None


#: The attribute of an admitted API request naming who it admitted (a cancel says who).
OPERATOR = "broker_operator"


async def _refusal(request: HttpRequest) -> JsonResponse | None:
    """Why this request may not use the API, or None if it may (then who it is, in the
    request's ``OPERATOR`` attribute)."""
    origin = request.headers.get("Origin")
    if origin is not None and not (_same_origin(request, origin) or origin_listed(origin)):
        return JsonResponse({"error": "Origin not allowed: add it to BROKER_ALLOWED_ORIGINS"},
                            status=403)
    if request.method == "POST" and request.content_type != "application/json":
        return JsonResponse({"error": "The control API takes JSON only: send "
                                      "'Content-Type: application/json'"}, status=415)
    guard = await get_guard()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        operator = guard.operator(token)
        setattr(request, OPERATOR, operator)
        return None if operator else JsonResponse({"error": FORBIDDEN}, status=403)
    user = await request.auser()
    if user.is_active and user.is_staff:
        if request.method == "POST" and _csrf_refused(request):
            return JsonResponse({"error": "CSRF check failed: send the csrftoken cookie's "
                                          "value as X-CSRFToken"}, status=403)
        setattr(request, OPERATOR, f"staff user '{user.get_username()}'")
        return None
    if guard.protected_mode and _peer(request).local:
        setattr(request, OPERATOR, "a loopback peer (protected mode)")
        return None
    return JsonResponse({"error": FORBIDDEN}, status=403)


def _peer(request: HttpRequest) -> Peer:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
               for k, v in request.headers.items()]
    return peer_of((request.META.get("REMOTE_ADDR"), 0), headers)


def api(view: View) -> View:
    """Guard an API view: access check, JSON body, errors as ``{"error": ...}`` (400 for
    a bad request, 503 while the broker cannot reach its registry or layer).

    ``csrf_exempt`` because the check depends on how the caller authenticated:
    a bearer token is no ambient credential, a session cookie is (see _refusal).
    """

    @functools.wraps(view)
    async def wrapper(request: HttpRequest) -> HttpResponse:
        refusal = await _refusal(request)
        if refusal is not None:
            return refusal
        try:
            return await view(request)
        except BadRequest as exc:
            return JsonResponse({"error": str(exc)}, status=400)
        except DispatchError as exc:  # Redis down, and the like: the caller may retry
            return JsonResponse({"error": f"{protocol.BROKER_UNAVAILABLE}: {exc}"}, status=503)

    return csrf_exempt(wrapper)


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError as exc:
        raise BadRequest(f"Malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Expected a JSON object")
    return body


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"Field '{name}' must be a non-empty string")
    return value


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name) or {}
    if not isinstance(value, dict):
        raise BadRequest(f"Field '{name}' must be a JSON object")
    return value


def _timeout(body: dict[str, Any]) -> float | None:
    value = body.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise BadRequest("Field 'timeout' must be a number of seconds (0-86400]")
    return float(value)


@require_safe  # GET or HEAD: load balancers probe with either
async def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the process serves HTTP (liveness: it asks nothing of Redis); to
    callers the API admits, also how many workers are online (null when the registry
    cannot be read) and which process answered (its host name and pid)."""
    dispatcher = await get_dispatcher()
    if await _refusal(request) is not None:
        return JsonResponse({"status": "ok"})
    try:
        workers: int | None = await get_registry().count()
    except Exception:  # noqa: BLE001 - alive all the same: /readyz tells what is wrong
        workers = None
    return JsonResponse({"status": "ok", "workers": workers, "process": dispatcher.process,
                         "pending": dispatcher.pending, "waiting": dispatcher.waiting})


@require_safe
async def readyz(request: HttpRequest) -> JsonResponse:
    """200 when this process can route a request end to end (a round trip through the
    channel layer to its own inbox, and the registry); 503 with the reason when it
    cannot, though it may still accept sockets."""
    dispatcher = await get_dispatcher()
    reason = await dispatcher.unready(READY_TIMEOUT)
    if reason is None:
        return JsonResponse({"status": "ready"})
    return JsonResponse({"status": "unavailable", "reason": reason}, status=503)


#: Seconds /readyz waits for each part of its round trip.
READY_TIMEOUT = 2.0


@require_GET
@api
async def metrics_view(request: HttpRequest) -> HttpResponse:
    """This process's metrics for Prometheus (see :mod:`.metrics`)."""
    return HttpResponse(await metrics.exposition(await get_dispatcher()),
                        content_type=CONTENT_TYPE_LATEST)


@require_GET
@api
async def workers(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"workers": await services.workers_list()})


@require_GET
@api
async def commands(request: HttpRequest) -> JsonResponse:
    """Every command offered now, by which workers, with its parameters;
    ``?command=NAME``: only that one (404 when no online worker offers it)."""
    command = request.GET.get("command")
    found = await services.describe(command)
    if command is not None and not found["commands"]:
        return JsonResponse({"error": f"No online worker offers '{command}'"}, status=404)
    # Megabytes for a big fleet: encoded beside the event loop, not on it.
    return HttpResponse(await asyncio.to_thread(orjson.dumps, found),
                        content_type="application/json")


@require_POST
@api
async def broadcast(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    if "message" not in body:
        raise BadRequest("Missing field 'message'")
    return JsonResponse({"sent_to": await services.broadcast(body["message"])})


@require_POST
@api
async def drain(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    worker_id = _text(body, "worker_id")
    draining = body.get("draining", True)
    if not isinstance(draining, bool):
        raise BadRequest("Field 'draining' must be true or false")
    if not await services.drain(worker_id, draining):
        return JsonResponse({"error": f"Unknown worker '{worker_id}'"}, status=404)
    return JsonResponse({"worker_id": worker_id, "draining": draining})


@require_POST
@api
async def send(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    response = await services.request(_text(body, "action"), _object(body, "params"),
                                      timeout=_timeout(body), worker_id=_text(body, "worker_id"))
    return JsonResponse(response.to_dict())


@require_POST
@api
async def cancel(request: HttpRequest) -> JsonResponse:
    """Cancel a running request by its id, whoever sent it (an operator's cancel)."""
    body = _body(request)
    request_id = _text(body, "request_id")
    found = await services.cancel(
        request_id, f"{getattr(request, OPERATOR, 'an operator')} through the control API")
    if not found:
        return JsonResponse({"error": f"No request '{request_id}' is running"}, status=404)
    return JsonResponse({"request_id": request_id, "cancelled": found})


@require_GET
async def request_status(request: HttpRequest, request_id: str) -> JsonResponse:
    """A request of the calling requester key: still running, or its kept answer.

    Needs ``Authorization: Bearer <requester API key>`` (another credential's request
    is not found), or a direct local peer in protected mode.
    """
    origin = request.headers.get("Origin")
    if origin is not None and not (_same_origin(request, origin) or origin_listed(origin)):
        return JsonResponse({"error": "Origin not allowed"}, status=403)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    guard = await get_guard()
    grant = guard.requester_grant(token if scheme.lower() == "bearer" and token else None,
                                  _peer(request))
    if grant is None:
        return JsonResponse({"error": "Forbidden: send 'Authorization: Bearer <requester "
                                      "API key>'"}, status=403)
    found = await services.status(grant.owner, request_id)
    if found is None:
        return JsonResponse({"error": f"No request '{request_id}' of yours is running or "
                                      "finished lately", "code": "unknown_request"},
                            status=404)
    if found == "running":
        return JsonResponse({"request_id": request_id, "state": "running"})
    return JsonResponse({"state": "finished", **json.loads(found)})


def _routing(body: dict[str, Any]) -> dict[str, Any]:
    """The optional routing fields of a call: ``select`` and ``affinity``."""
    try:
        select = protocol.parse_labels(body.get("select"), "select")
    except protocol.ProtocolError as exc:
        raise BadRequest(str(exc)) from None
    affinity = body.get("affinity")
    if affinity is not None and (not isinstance(affinity, str) or not affinity
                                 or len(affinity) > protocol.MAX_ID_CHARS):
        raise BadRequest(f"Field 'affinity' must be a string of 1 to {protocol.MAX_ID_CHARS} "
                         "characters")
    return {"select": select, "affinity": affinity}


@require_POST
@api
async def call(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    traceparent = protocol.parse_traceparent(request.headers.get("traceparent")
                                             or body.get("traceparent"))
    response = await services.request(_text(body, "command"), _object(body, "data"),
                                      timeout=_timeout(body), traceparent=traceparent,
                                      **_routing(body))
    return JsonResponse(response.to_dict())


@require_POST
@api
async def explain(request: HttpRequest) -> JsonResponse:
    """A dry run: how a request with this body would be routed now."""
    body = _body(request)
    return JsonResponse(await services.explain(_text(body, "command"), **_routing(body)))
