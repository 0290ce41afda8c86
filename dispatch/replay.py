"""Run a failed job again: its command and data as they were accepted, a new request
id, and ``replay_of`` naming the old one (the admin's *Dead letters*)."""

from __future__ import annotations

from typing import Any

from workers import protocol

from . import fleet
from .models import Job


class NotReplayable(ValueError):
    """The job's request was not kept (answered before its first commit), or it is
    not done."""


def replay(job: Job) -> str:
    """Start ``job`` again (in this broker process); its new request id."""
    if job.state != Job.State.DONE or not job.request:
        raise NotReplayable(f"{job.request_id}: its request was not kept")
    again = Job.objects.filter(replay_of=job.request_id).values_list("request_id", flat=True)
    if again.exists():  # (a second click, another staff user: it would run twice)
        raise NotReplayable(f"{job.request_id}: already run again as {again.first()} (run "
                            "that one again if it failed too)")
    body = protocol.loads_object(job.request)
    started = fleet.start(job.command, body.get("data") or {}, **options_of(job, body))
    return started.request_id


def options_of(job: Job, body: dict[str, Any]) -> dict[str, Any]:
    """The routing and lifetime the job had (its timeout as it was given)."""
    since = job.not_before or job.created_at
    return {"timeout": max(0.001, (job.deadline - since).total_seconds()),
            "priority": int(body.get("priority") or 0),
            "select": dict(body.get("select") or []) or None,
            "affinity": body.get("affinity"), "task": job.task or None,
            "keep": body.get("keep"), "wait_for_workers": bool(body.get("wait_for_workers")),
            "replay_of": job.request_id}
