"""Django's tasks on the fleet: ``TASKS = {"default": {"BACKEND":
"dispatch.tasks.FleetBackend"}}`` (docs/django.md).

Works with ``django.tasks`` (Django 6) and the ``django-tasks`` backport (Django 5.2);
``from dispatch.tasks import task`` is the decorator of whichever this Django has.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from .backend import FleetBackend, FleetTask, FleetTaskResult, our_priority
from .compat import InvalidTask, task
from .known import loaded_task
from .runner import TaskCancelled, report_progress

__all__ = ["FleetBackend", "FleetTask", "FleetTaskResult", "TaskCancelled", "enqueue_on_commit",
           "our_priority", "report_progress", "schedule_request", "task"]


def enqueue_on_commit(task: Any, *args: Any, using: str | None = None, **kwargs: Any) -> None:
    """Enqueue ``task`` once the current transaction commits (at once outside one): a
    task that reads what the view just wrote never runs before it is there, and one
    whose transaction rolled back never runs."""
    transaction.on_commit(lambda: task.enqueue(*args, **kwargs), using=using)


def schedule_request(schedule: Any) -> tuple[str, dict[str, Any]]:
    """The fleet command and data that run a schedule's Django task (``schedule.task``,
    a module path; ``schedule.data``, its keyword arguments): what
    :mod:`dispatch.core.scheduler` fires."""
    task = loaded_task(schedule.task.strip())
    if task is None:
        raise InvalidTask(f"{schedule.task!r} is not a task the broker loaded (an app's "
                          "tasks module, or DISPATCH_TASK_MODULES)")
    task.get_backend().validate_task(task)
    return FleetBackend._request(task, "", [], dict(schedule.data or {}))
