"""Which consumer serves a websocket: by path, else by the port it came in on.

Daphne listens on the worker, requester and HTTP ports with one application, and
``scope["server"]`` tells which port a connection arrived on. The paths
``/ws/worker/`` and ``/ws/requester/`` work on any port, so a single port behind
a proxy serves both kinds of peer. The worker and requester ports, which face the
fleet (often the internet), serve nothing else: no dashboard socket, and of HTTP
only ``/healthz`` and ``/readyz`` (:class:`HttpPorts`); the admin, the control API
and the dashboard are on the HTTP port.

With the ``ECHO_ROUTE`` setting on (tests only), ``/ws/echo/`` echoes every frame
back, so a protocol-conformance suite can exercise daphne and Channels directly.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.auth import AuthMiddlewareStack
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousOperation
from django.http import HttpRequest, HttpResponse, HttpResponseNotFound

from workers.protocol import CloseCode, quote

from .. import conf
from ..core.scheduler import get_scheduler, stop_scheduler
from .dashboard import DashboardSocket
from .echo import EchoConsumer
from .requesters import RequesterConsumer
from .workers import WorkerConsumer

log = logging.getLogger("dispatch.routing")

#: HTTP paths the worker and requester ports answer (for load balancers' probes).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
WORKER_PATH = "/ws/worker"
REQUESTER_PATH = "/ws/requester"
ECHO_PATH = "/ws/echo"
DASHBOARD_PATH = "/ws/dashboard"


def on_fleet_port(scope: dict[str, Any]) -> bool:
    """The connection came in on the worker or the requester port."""
    port = (scope.get("server") or (None, None))[1]
    return port is not None and port != conf.get("HTTP_PORT") and \
        port in (conf.get("WORKER_PORT"), conf.get("REQUESTER_PORT"))


class HttpPorts:
    """ASGI app for HTTP scopes: everything on the HTTP port, only the probes on the
    worker and requester ports (404 for the rest, before Django sees it)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("path", "").rstrip("/") in PROBE_PATHS or not on_fleet_port(scope):
            await self.app(scope, receive, send)
            return
        body = b"Not found: this port serves workers or requesters; the admin, the " \
               b"control API and the dashboard are on the HTTP port\n"
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class SocketRouter:
    """ASGI app for websocket scopes that hands each to the right consumer."""

    def __init__(self) -> None:
        self.worker = WorkerConsumer.as_asgi()
        self.requester = RequesterConsumer.as_asgi()
        self.echo = EchoConsumer.as_asgi()
        # The only socket that reads the session cookie (a staff login admits it).
        self.dashboard = AuthMiddlewareStack(DashboardSocket.as_asgi())

    def choose(self, scope: dict[str, Any]) -> Any:
        path = scope.get("path", "/").rstrip("/")
        if path == WORKER_PATH:
            return self.worker
        if path == REQUESTER_PATH:
            return self.requester
        if path == DASHBOARD_PATH:
            return None if on_fleet_port(scope) else self.dashboard
        if path == ECHO_PATH and conf.get("ECHO_ROUTE"):
            return self.echo
        if path == "":
            port = (scope.get("server") or (None, None))[1]
            if port == conf.get("WORKER_PORT"):
                return self.worker
            if port == conf.get("REQUESTER_PORT"):
                return self.requester
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = self.choose(scope)
        if app is None:
            log.info("refused a websocket on %s%s: no such endpoint", scope.get("server"),
                     quote(scope.get("path")))
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": CloseCode.NO_SUCH_ENDPOINT})
            return
        await app(scope, receive, send)


class StaticFiles(ASGIStaticFilesHandler):
    """Django's static files, where a path that leads outside them (``/static/../..``)
    is not found, as it is: Django raises, and anyone could make the broker log a
    traceback and answer 500 as often as they liked."""

    async def get_response_async(self, request: HttpRequest) -> HttpResponse:
        try:
            return await super().get_response_async(request)
        except SuspiciousOperation:
            return HttpResponseNotFound(b"Not Found", content_type="text/plain")


class Lifespan:
    """ASGI lifespan, for servers that send it (uvicorn; daphne does not, and
    ``runbroker`` starts the scheduler itself): due periodic schedules fire from this
    process too, until it stops."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await get_scheduler()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await stop_scheduler()
                await send({"type": "lifespan.shutdown.complete"})
                return
