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

from workers import protocol
from workers.errors import RequestFailed

from .. import fleet
from ..models import Job
from .compat import TaskError, TaskResultDoesNotExist, TaskResultStatus
from .known import loaded_task

if TYPE_CHECKING:
    from .backend import FleetBackend, FleetTaskResult

#: How a fleetworker words a task's own exception: its class path on the first line
#: (then the message), its traceback after a blank line.
RAISED = re.compile(r"Task raised (?P<path>[\w.]+)(?::.*)?")

_STATUS = {Job.State.QUEUED: TaskResultStatus.READY,
           Job.State.RUNNING: TaskResultStatus.RUNNING}


def read_result(backend: FleetBackend, result_id: str) -> FleetTaskResult:
    from .backend import COMMAND_PREFIX, FleetTaskResult

    rows = Job.objects.filter(request_id=result_id).exclude(task="").order_by("created_at")
    # Another credential may send a job with this id (the id is no secret): it is read
    # only when none of this process's credential has one (its rows come first), and
    # then the first that came (the backend's own row: made before anyone knew the id).
    job = rows.filter(owner=fleet.owner_here()).first() or rows.first()
    if job is None:
        raise TaskResultDoesNotExist(result_id)
    task = loaded_task(job.task)  # (its row names it: never imported on its word)
    if task is None:
        raise TaskResultDoesNotExist(f"{result_id}: its task {job.task!r} is not loaded "
                                     "in this process")
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
