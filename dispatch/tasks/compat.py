"""Django's tasks API from wherever this Django has it: ``django.tasks`` (Django 6) or
the ``django-tasks`` backport (Django 5.2). One code path for both: the rest of
:mod:`dispatch.tasks` imports from here."""

from __future__ import annotations

try:
    from django.tasks import DEFAULT_TASK_QUEUE_NAME, TaskResultStatus, task, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import (TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task, TaskContext,
                                   TaskError, TaskResult)
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
except ImportError:  # Django 5.2: pip install django-tasks
    from django_tasks import (  # type: ignore[no-redef]
        DEFAULT_TASK_QUEUE_NAME, TaskResultStatus, task, task_backends)
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef]
    from django_tasks.base import (  # type: ignore[no-redef]
        TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, Task, TaskContext, TaskError, TaskResult)
    from django_tasks.exceptions import (  # type: ignore[no-redef]
        InvalidTaskError as InvalidTask, TaskResultDoesNotExist)
    from django_tasks.signals import (  # type: ignore[no-redef]
        task_enqueued, task_finished, task_started)

__all__ = ["BaseTaskBackend", "DEFAULT_TASK_QUEUE_NAME", "InvalidTask", "TASK_MAX_PRIORITY",
           "TASK_MIN_PRIORITY", "Task", "TaskContext", "TaskError", "TaskResult",
           "TaskResultDoesNotExist", "TaskResultStatus", "task", "task_backends", "task_enqueued",
           "task_finished", "task_started"]
