"""HTTP edge: health check and the control API that management commands use.

The API needs a staff session or ``Authorization: Bearer <admin key>``; in protected
mode (no credentials yet) loopback peers need nothing, so the embedded default
works on one machine with no set-up.
"""

from __future__ import annotations

import functools
import hmac
import json
from typing import Any, Awaitable, Callable

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from . import conf, services
from .auth import get_guard, is_loopback_host
from .forwarding import get_dispatcher
from .registry import get_registry

View = Callable[..., Awaitable[JsonResponse]]


class BadRequest(ValueError):
    """The body of an API call is not what the endpoint takes."""


async def _allowed(request: HttpRequest) -> bool:
    """A staff session, an admin key or ``API_TOKEN``; or loopback in protected mode."""
    guard = await get_guard()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        static = conf.get("API_TOKEN")
        if (static and hmac.compare_digest(token.encode(), static.encode())) or \
                guard.check_api_token(token):
            return True
    user = await request.auser()
    if user.is_active and user.is_staff:
        return True
    return guard.protected_mode and is_loopback_host(request.META.get("REMOTE_ADDR"))


def api(view: View) -> View:
    """Guard an API view: access check, JSON body, errors as ``{"error": ...}``."""

    @functools.wraps(view)
    async def wrapper(request: HttpRequest) -> JsonResponse:
        if not await _allowed(request):
            return JsonResponse({"error": "Forbidden: the control API needs a staff login or "
                                          "'Authorization: Bearer <admin key>' (python manage.py "
                                          "token create admin NAME)"}, status=403)
        try:
            return await view(request)
        except BadRequest as exc:
            return JsonResponse({"error": str(exc)}, status=400)

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


@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    """200 once the broker can take work, with the number of online workers."""
    dispatcher = await get_dispatcher()
    return JsonResponse({"status": "ok", "workers": await get_registry().count(),
                         "process": dispatcher.process, "pending": len(dispatcher.pending),
                         "waiting": len(dispatcher.waiting)})


@require_GET
@api
async def workers(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"workers": await services.workers_list()})


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
async def call(request: HttpRequest) -> JsonResponse:
    body = _body(request)
    response = await services.request(_text(body, "command"), _object(body, "data"),
                                      timeout=_timeout(body))
    return JsonResponse(response.to_dict())
