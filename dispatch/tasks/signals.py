"""``task_started`` and ``task_finished``, sent by the broker as a task's job changes
state (first given to a worker; answered), whoever runs it: a fleetworker or a
Django-free worker serving a fleet command.

Receivers are the project's code: they run in one thread of their own, in order,
never on the broker's event loop; one that raises is logged, not fatal.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone as tz
from typing import Any

from django.dispatch import Signal

from workers.protocol import ApiResponse

from ..core.dispatcher import task_watchers
from ..core.requests import Request
from .compat import TaskResultStatus, task_finished, task_started
from .known import load_task_modules, loaded_task

log = logging.getLogger("dispatch.tasks")

_sending = ThreadPoolExecutor(1, "dispatch-task-signals")


def install() -> None:
    """Have this process's dispatchers tell of their tasks' jobs (a broker process),
    for the tasks of the modules it loads now."""
    if watch not in task_watchers:
        load_task_modules()
        task_watchers.append(watch)


def watch(request: Request, response: ApiResponse | None) -> None:
    """A task's job was given to a worker (``response`` None) or answered."""
    if response is not None:
        status = TaskResultStatus.SUCCESSFUL if response.success else TaskResultStatus.FAILED
        _sending.submit(_send, task_finished, request, status, response, time.time())
    elif request.attempts == 1:  # started: its first worker has it
        _sending.submit(_send, task_started, request, TaskResultStatus.RUNNING, None,
                        time.time())


def _send(signal: Signal, request: Request, status: Any, response: ApiResponse | None,
          when: float) -> None:
    from .backend import COMMAND_PREFIX, FleetBackend, FleetTaskResult
    from .results import task_error

    task = loaded_task(request.task)  # (a peer names it: never imported on its word)
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
