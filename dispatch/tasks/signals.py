"""``task_started`` and ``task_finished``, sent by the broker as a task's job changes
state (first given to a worker; answered), whoever runs it: a fleetworker or a
Django-free worker serving a fleet command.

Receivers are the project's code: they run in one thread of their own, in order,
never on the broker's event loop; one that raises is logged, not fatal.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone as tz
from typing import Any

from django.dispatch import Signal
from django.utils.module_loading import import_string

from workers.protocol import ApiResponse

from ..core.dispatcher import task_watchers
from ..core.requests import Request
from .compat import Task, TaskResultStatus, task_finished, task_started

log = logging.getLogger("dispatch.tasks")

_sending = ThreadPoolExecutor(1, "dispatch-task-signals")


def install() -> None:
    """Have this process's dispatchers tell of their tasks' jobs (a broker process)."""
    if watch not in task_watchers:
        task_watchers.append(watch)


def watch(request: Request, response: ApiResponse | None) -> None:
    """A task's job was given to a worker (``response`` None) or answered."""
    if response is not None:
        status = TaskResultStatus.SUCCESSFUL if response.success else TaskResultStatus.FAILED
        _sending.submit(_send, task_finished, request, status, response, time.time())
    elif request.attempts == 1:  # started: its first worker has it
        _sending.submit(_send, task_started, request, TaskResultStatus.RUNNING, None,
                        time.time())


@functools.lru_cache(maxsize=1024)
def _task(path: str) -> Task | None:
    try:
        task = import_string(path)
    except ImportError:
        log.info("task %s is not importable in the broker: no task signals for it", path)
        return None
    return task if isinstance(task, Task) else None


def _send(signal: Signal, request: Request, status: Any, response: ApiResponse | None,
          when: float) -> None:
    from .backend import COMMAND_PREFIX, FleetBackend, FleetTaskResult
    from .results import task_error

    task = _task(request.task)
    if task is None:
        return
    data = request.data
    args, kwargs = (data.get("args") or [], data.get("kwargs") or {}) \
        if request.command.startswith(COMMAND_PREFIX) else ([], data)
    moment = datetime.fromtimestamp(when, tz.utc)
    result = FleetTaskResult(
        task=task, id=request.request_id, status=status,
        enqueued_at=datetime.fromtimestamp(request.started, tz.utc),
        started_at=moment if signal is task_started else None,
        finished_at=moment if signal is task_finished else None,
        last_attempted_at=moment, args=list(args), kwargs=dict(kwargs), backend=task.backend,
        errors=[task_error(response.to_dict())] if response and not response.success else [],
        worker_ids=list(request.tried))
    if response is not None and response.success:
        object.__setattr__(result, "_return_value", response.data)
    for receiver, outcome in signal.send_robust(FleetBackend, task_result=result):
        if isinstance(outcome, Exception):
            log.error("a %s receiver (%s) raised: %r", "task_started" if signal is task_started
                      else "task_finished", getattr(receiver, "__qualname__", receiver), outcome)
