"""A task's result, read from its job row (the broker's database).

The job's state says the task's status: queued -> READY, running -> RUNNING,
answered -> SUCCESSFUL, or FAILED with a ``TaskError`` when the answer is a failure
(the task raised; or the broker gave up: timeout, cancelled, worker lost...). A
failure that the task raised names its exception's class and carries its traceback
(see :mod:`dispatch.tasks.runner`); one the broker gave names the requester client's
error class for its code (``workers.errors.Timeout``...).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from workers import protocol
from workers.errors import RequestFailed

from ..models import Job
from .compat import Task, TaskError, TaskResultDoesNotExist, TaskResultStatus

if TYPE_CHECKING:
    from .backend import FleetBackend, FleetTaskResult

#: How a fleetworker words a task's own exception: its class path on the first line
#: (then the message), its traceback after a blank line.
RAISED = re.compile(r"Task raised (?P<path>[\w.]+)(?::.*)?")

_STATUS = {Job.State.QUEUED: TaskResultStatus.READY,
           Job.State.RUNNING: TaskResultStatus.RUNNING}


def read_result(backend: FleetBackend, result_id: str) -> FleetTaskResult:
    from .backend import COMMAND_PREFIX, FleetTaskResult

    job = Job.objects.filter(request_id=result_id).exclude(task="").order_by(
        "-created_at").first()
    if job is None:
        raise TaskResultDoesNotExist(result_id)
    try:
        task = import_string(job.task)
    except ImportError as exc:
        raise TaskResultDoesNotExist(f"{result_id}: its task {job.task!r} cannot be "
                                     f"imported here ({exc})") from None
    if not isinstance(task, Task):
        raise TaskResultDoesNotExist(f"{result_id}: {job.task!r} is not a task")
    body = protocol.loads_object(job.request) if job.request else {}
    data = body.get("data") or {}
    if job.command.startswith(COMMAND_PREFIX):
        args, kwargs = list(data.get("args") or []), dict(data.get("kwargs") or {})
    else:
        args, kwargs = [], dict(data)
    status, value, errors = _outcome(job)
    tried = json.loads(job.tried) if job.tried else []
    progress = json.loads(job.progress) if job.progress else None
    result = FleetTaskResult(
        task=task, id=result_id, status=status, enqueued_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
        last_attempted_at=job.attempted_at, args=args, kwargs=kwargs,
        backend=backend.alias, errors=errors,
        worker_ids=[str(w) for w in tried] or ([job.worker_id] if job.worker_id else []),
        progress=tuple(progress) if isinstance(progress, list) else None)
    object.__setattr__(result, "_return_value", value)
    return result


def _outcome(job: Job) -> tuple[Any, Any, list[Any]]:
    """(status, return value, errors) of a job row."""
    if job.state != Job.State.DONE:
        return _STATUS[Job.State(job.state)], None, []
    answer = protocol.loads_object(job.answer) if job.answer else {}
    if answer.get("success"):
        return TaskResultStatus.SUCCESSFUL, answer.get("data"), []
    return TaskResultStatus.FAILED, None, [task_error(answer)]


def task_error(answer: dict[str, Any]) -> TaskError:
    """The TaskError of a failure answer."""
    text = str(answer.get("error") or "failed")
    head, _, rest = text.partition("\n")
    raised = RAISED.fullmatch(head)
    if raised is not None:
        return TaskError(exception_class_path=raised["path"], traceback=rest.strip() or head)
    failed = RequestFailed.from_answer(text, answer.get("code"), None)
    kind = type(failed)
    return TaskError(exception_class_path=f"{kind.__module__}.{kind.__qualname__}",
                     traceback=text)
