"""What a ``fleetworker`` runs: a queue's plain tasks, by their module path.

The worker serves ``task:<queue>`` for each queue it is given; each request names a
task (``{"task": "app.tasks.send_mail", "args": [...], "kwargs": {...}}``), which runs
in a thread of the worker (an async task on a loop of its own there), with the
project's database connections looked after as a request's are. Whatever the task
raises becomes a failure naming the exception's class, with its traceback (read back
into ``TaskResult.errors`` by :mod:`dispatch.tasks.results`).
"""

from __future__ import annotations

import inspect
import threading
import traceback
from typing import Any

from asgiref.sync import async_to_sync
from django.db import close_old_connections
from django.utils import timezone

from workers.handlers import BadParams, CommandError, CommandRegistry
from workers.jobs import JobContext
from workers.protocol import quote

from .backend import COMMAND_PREFIX, FleetTaskResult
from .compat import Task, TaskContext, TaskResultStatus
from .known import loaded_task

#: Characters of a traceback kept in a failure (its end: where it was raised).
TRACEBACK_CHARS = 8000

_running = threading.local()


class TaskCancelled(Exception):
    """Raised by :func:`report_progress` in a task whose job was cancelled: a task in a
    thread cannot be stopped from outside, so it stops at its next report."""


def report_progress(fraction: float | None = None, message: str | None = None) -> None:
    """From inside a task run by a fleetworker: how far it got (``result.progress``
    shows the last report; it also tells the broker the task lives). Raises
    :class:`TaskCancelled` once its job was cancelled. Elsewhere, nothing."""
    ctx: JobContext | None = getattr(_running, "ctx", None)
    if ctx is None:
        return
    if ctx.cancelled:
        raise TaskCancelled(ctx.cancel_reason or "cancelled")
    ctx.progress(fraction, message)


def registry_for(queues: list[str], worker_name: str) -> CommandRegistry:
    """The commands a fleetworker serves: ``task:<queue>`` for each queue."""
    registry = CommandRegistry()

    def run_task(task: str, args: list[Any] | None = None,
                 kwargs: dict[str, Any] | None = None, id: str = "", *,
                 ctx: JobContext) -> Any:
        """Run a Django task of this project (by its module path); ``id``: its result's."""
        if not isinstance(args or [], list) or not isinstance(kwargs or {}, dict):
            raise BadParams("a task's args must be a list and its kwargs an object")
        return _run(task, list(args or []), dict(kwargs or {}), id or ctx.request_id, ctx,
                    worker_name)

    for queue in queues:
        registry.add(COMMAND_PREFIX + queue, run_task)
    return registry


def _run(path: str, args: list[Any], kwargs: dict[str, Any], result_id: str,
         ctx: JobContext, worker_name: str) -> Any:
    task = loaded_task(path)
    if task is None or getattr(task, "command", ""):
        raise BadParams(f"{quote(path, 200)!r} is not a task this fleetworker knows (it "
                        "knows those of the modules it loaded at start: each app's tasks "
                        "module, DISPATCH_TASK_MODULES, --tasks)")
    close_old_connections()
    _running.ctx = ctx
    try:
        func = task.func
        if task.takes_context:
            args = [TaskContext(task_result=_running_result(task, result_id, args, kwargs,
                                                            worker_name)), *args]
        if inspect.iscoroutinefunction(func):
            return async_to_sync(func)(*args, **kwargs)
        return func(*args, **kwargs)
    except CommandError:
        raise
    except Exception as exc:  # the task's own failure: its class and traceback go back
        kind = type(exc)
        trace = traceback.format_exc()[-TRACEBACK_CHARS:]
        first = str(exc).splitlines()[0][:500] if str(exc) else ""
        raise CommandError(f"Task raised {kind.__module__}.{kind.__qualname__}"
                           f"{': ' + first if first else ''}\n\n{trace}") from None
    finally:
        _running.ctx = None
        close_old_connections()


def _running_result(task: Task, result_id: str, args: list[Any], kwargs: dict[str, Any],
                    worker_name: str) -> FleetTaskResult:
    now = timezone.now()
    return FleetTaskResult(
        task=task, id=result_id, status=TaskResultStatus.RUNNING, enqueued_at=None,
        started_at=now, finished_at=None, last_attempted_at=now, args=args, kwargs=kwargs,
        backend=task.backend, errors=[], worker_ids=[worker_name])
