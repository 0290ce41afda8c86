"""Django's tasks on the fleet: ``TASKS = {"default": {"BACKEND":
"dispatch.tasks.FleetBackend"}}`` (docs/django.md).

Works with ``django.tasks`` (Django 6) and the ``django-tasks`` backport (Django 5.2);
``from dispatch.tasks import task`` is the decorator of whichever this Django has.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from .backend import FleetBackend, FleetTask, FleetTaskResult, our_priority
from .compat import task
from .runner import report_progress

__all__ = ["FleetBackend", "FleetTask", "FleetTaskResult", "enqueue_on_commit",
           "our_priority", "report_progress", "task"]


def enqueue_on_commit(task: Any, *args: Any, using: str | None = None, **kwargs: Any) -> None:
    """Enqueue ``task`` once the current transaction commits (at once outside one): a
    task that reads what the view just wrote never runs before it is there, and one
    whose transaction rolled back never runs."""
    transaction.on_commit(lambda: task.enqueue(*args, **kwargs), using=using)
