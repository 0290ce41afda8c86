"""``FleetBackend``: Django tasks as durable jobs of the broker.

A task enqueued from any Django process becomes a job of the broker (through
:mod:`dispatch.fleet`: in a broker process directly, elsewhere over its requester
socket), stored before ``enqueue`` returns. A plain task runs on a ``fleetworker``
(a worker inside the Django project, which dials out like any worker) serving its
queue: the command ``task:<queue>``. A task declared ``@task(command="resize")``
is the fleet command ``resize`` instead, run by whatever worker offers it, with the
task's keyword arguments as its data. Results are read from the job store (the
broker's database), kept ``KEEP`` seconds after they finish.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.core import checks
from django.utils import timezone

from .. import fleet
from .compat import (TASK_MAX_PRIORITY, TASK_MIN_PRIORITY, BaseTaskBackend, InvalidTask, Task,
                     TaskResult, TaskResultStatus, task_enqueued)
from .results import read_result

#: The command a fleetworker serves for each queue of plain tasks.
COMMAND_PREFIX = "task:"
#: Options and their defaults (``TASKS[alias]["OPTIONS"]``).
DEFAULTS: dict[str, Any] = {
    "TIMEOUT": 3600.0,  # seconds a task may take, counted from when it may start
    "KEEP": 7 * 86400.0,  # seconds its result is kept after it finished
    "SELECT": {},  # queue name -> labels its workers must have
}
OUR_PRIORITIES = 9  # the broker's priorities are 0..9


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetTask(Task):  # type: ignore[misc]
    """A task; with ``command``, a fleet command run by any worker offering it."""

    command: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetTaskResult(TaskResult):  # type: ignore[misc]
    """A task's result, with the broker's extras: its last progress report and cancel."""

    progress: tuple[float | None, str] | None = None

    def cancel(self) -> None:
        """Stop it: answered ``cancelled`` (FAILED), its worker told to stop."""
        fleet.cancel(self.id)

    async def acancel(self) -> None:
        await fleet.acancel(self.id)

    def refresh(self) -> None:
        self._take(self.task.get_backend().get_result(self.id))

    async def arefresh(self) -> None:
        self._take(await self.task.get_backend().aget_result(self.id))

    def _take(self, fresh: TaskResult) -> None:
        for name in ("status", "enqueued_at", "started_at", "finished_at",
                     "last_attempted_at", "errors", "worker_ids", "_return_value",
                     "progress"):
            object.__setattr__(self, name, getattr(fresh, name, None))


class FleetBackend(BaseTaskBackend):  # type: ignore[misc]
    """``TASKS = {"default": {"BACKEND": "dispatch.tasks.FleetBackend",
    "QUEUES": ["default", "gpu"], "OPTIONS": {"SELECT": {"gpu": {"gpu": "a100"}}}}}``."""

    task_class = FleetTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.settings = {**DEFAULTS, **self.options}

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        result_id = str(uuid.uuid4())
        command, data = self._request(task, result_id, list(args), dict(kwargs))
        fleet.start(command, data, **self._options(task, result_id))
        return self._enqueued(task, result_id, args, kwargs)

    async def aenqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        result_id = str(uuid.uuid4())
        command, data = self._request(task, result_id, list(args), dict(kwargs))
        await fleet.astart(command, data, **self._options(task, result_id))
        return self._enqueued(task, result_id, args, kwargs)

    def get_result(self, result_id: str) -> TaskResult:
        return read_result(self, str(result_id))

    async def aget_result(self, result_id: str) -> TaskResult:
        return await sync_to_async(read_result, thread_sensitive=True)(self, str(result_id))

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        command = getattr(task, "command", "")
        if command and (command.startswith(COMMAND_PREFIX) or not command.isprintable()):
            raise InvalidTask(f"command {command!r} is not a fleet command's name")

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        problems = list(super().check(**kwargs))
        options = self.settings
        unknown = sorted(set(options) - set(DEFAULTS) - {"URL", "KEY"})
        if unknown:
            problems.append(checks.Error(
                f"TASKS[{self.alias!r}]['OPTIONS'] has unknown options: {', '.join(unknown)}",
                hint=f"known: {', '.join(sorted([*DEFAULTS, 'URL', 'KEY']))}",
                id="dispatch.T001"))
        for name in ("TIMEOUT", "KEEP"):
            if not isinstance(options[name], (int, float)) or options[name] <= 0:
                problems.append(checks.Error(f"OPTIONS['{name}'] must be seconds above 0",
                                             id="dispatch.T002"))
        select = options["SELECT"]
        if not isinstance(select, dict) or not all(
                isinstance(q, str) and isinstance(labels, dict) for q, labels in select.items()):
            problems.append(checks.Error("OPTIONS['SELECT'] maps queue names to labels, e.g. "
                                         "{'gpu': {'gpu': 'a100'}}", id="dispatch.T003"))
        elif self.queues and (stray := sorted(set(select) - set(self.queues))):
            problems.append(checks.Warning(
                f"OPTIONS['SELECT'] names queues not in QUEUES: {', '.join(stray)}",
                id="dispatch.T004"))
        return problems

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _request(task: Task, result_id: str, args: list[Any], kwargs: dict[str, Any]
                 ) -> tuple[str, dict[str, Any]]:
        """The fleet request that runs ``task``: its command and data."""
        command = getattr(task, "command", "")
        if not command:
            body = {"task": task.module_path, "args": args, "kwargs": kwargs}
            if result_id:  # (else its request id: a schedule's firing)
                body["id"] = result_id
            return COMMAND_PREFIX + task.queue_name, body
        if args:
            raise InvalidTask(f"task {task.name!r} runs the fleet command {command!r}, "
                              "which takes keyword arguments only")
        return command, kwargs

    def _options(self, task: Task, result_id: str) -> dict[str, Any]:
        select = dict((self.settings["SELECT"] or {}).get(task.queue_name) or {})
        return {"request_id": result_id, "task": task.module_path,
                "timeout": float(self.settings["TIMEOUT"]), "keep": float(self.settings["KEEP"]),
                "priority": our_priority(task.priority), "select": select or None,
                "not_before": task.run_after, "wait_for_workers": True}

    def _enqueued(self, task: Task, result_id: str, args: Any, kwargs: Any) -> TaskResult:
        result = FleetTaskResult(
            task=task, id=result_id, status=TaskResultStatus.READY,
            enqueued_at=timezone.now(), started_at=None, finished_at=None,
            last_attempted_at=None, args=list(args), kwargs=dict(kwargs),
            backend=self.alias, errors=[], worker_ids=[])
        task_enqueued.send(type(self), task_result=result)
        return result


def our_priority(priority: int) -> int:
    """Django's -100..100 onto the broker's 0..9 (0 onto 4; the ends onto the ends)."""
    span = TASK_MAX_PRIORITY - TASK_MIN_PRIORITY
    return (priority - TASK_MIN_PRIORITY) * OUR_PRIORITIES // span

