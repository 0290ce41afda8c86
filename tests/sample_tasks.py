"""Django tasks for the tests (run by a fleetworker, or named fleet commands)."""

from __future__ import annotations

import time

from dispatch.tasks import report_progress, task


@task()
def add(a: int, b: int) -> int:
    return a + b


@task(queue_name="default", takes_context=True)
def whoami(context, note: str = "") -> dict:
    return {"id": context.task_result.id, "attempt": context.attempt, "note": note}


@task()
def slow(seconds: float) -> float:
    for i in range(10):
        report_progress((i + 1) / 10, f"step {i + 1}")
        time.sleep(seconds / 10)
    return seconds


@task()
def fails(text: str) -> None:
    raise ValueError(text)


@task()
async def async_add(a: int, b: int) -> int:
    return a + b


@task(command="echo")
def echo(message: str = "") -> None:
    """Runs as the fleet command 'echo' on any worker that offers it."""


def _record_signals() -> None:
    """With $TASK_SIGNALS_FILE set (the broker of tests/test_tasks.py), each task signal
    the broker sends is a line there: signal, task, status."""
    import json
    import os

    path = os.environ.get("TASK_SIGNALS_FILE")
    if not path:
        return
    try:
        from django.tasks.signals import task_finished, task_started
    except ImportError:
        from django_tasks.signals import task_finished, task_started

    def write(name: str):
        def receiver(sender, task_result, **kwargs):
            with open(path, "a") as f:
                f.write(json.dumps([name, task_result.task.name, task_result.id,
                                    str(task_result.status)]) + "\n")
        return receiver

    for name, signal in (("started", task_started), ("finished", task_finished)):
        receiver = write(name)
        _receivers.append(receiver)  # (signals hold receivers weakly)
        signal.connect(receiver)


_receivers: list = []
_record_signals()


@task()
def big(size: int) -> str:
    return "x" * size
