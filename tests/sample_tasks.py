"""Django tasks for the tests (run by a fleetworker, or named fleet commands)."""

from __future__ import annotations

import time

from dispatch.tasks import report_progress

try:
    from django.tasks import task
except ImportError:  # Django 5.2
    from django_tasks import task


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
