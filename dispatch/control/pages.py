"""Pages for people: the landing page and the live dashboard.

The landing page says what this is and where to go (it shows nothing of the fleet:
anyone may read it). The dashboard holds no data: it opens ``/ws/dashboard/``, which
decides who may watch (see :mod:`dispatch.transport.dashboard`) and pushes what to show.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.http.request import split_domain_port
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_safe

from .. import conf
from ..models import Credential


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    host = split_domain_port(request.get_host())[0] or "localhost"
    ports = {"worker_port": conf.get("WORKER_PORT"), "requester_port": conf.get("REQUESTER_PORT")}
    return render(request, "dispatch/home.html", {
        "host": host, **ports, "worker_url": f"ws://{host}:{ports['worker_port']}",
        "requester_url": f"ws://{host}:{ports['requester_port']}",
        "protected": not Credential.objects.exists()})


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "dispatch/dashboard.html")
