"""Pages for people: the live dashboard.

The page holds no data: it opens ``/ws/dashboard/``, which decides who may watch
(see :mod:`dispatch.transport.dashboard`) and pushes what to show.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "dispatch/dashboard.html")
