"""A Django view that enqueues a task, as a project's own view would (tests/test_tasks.py
calls it in a web process that is not the broker)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from dispatch.tasks import enqueue_on_commit
from tests import sample_tasks


def start_add(request: HttpRequest) -> JsonResponse:
    result = sample_tasks.add.enqueue(int(request.GET["a"]), int(request.GET["b"]))
    return JsonResponse({"id": result.id, "status": result.status})


def start_after_commit(request: HttpRequest) -> JsonResponse:
    enqueue_on_commit(sample_tasks.add, 1, 2)
    return JsonResponse({"queued": True})
