"""What the broker remembers in the database: worker registrations, request history,
credentials, and the job store.

Live state (who is online, who is busy) lives in the registry. Registrations and
history are written in batches by :mod:`dispatch.history` so the admin can answer
"who was connected when" and "what happened to request X". The job store
(:class:`Job`, written by :mod:`dispatch.store` in commits a few milliseconds apart)
keeps every accepted request until it is answered and its answer a while after, so
that a broker restart loses none.

Integer fields are plain (not ``Positive*``) on purpose: a database CHECK constraint
that one odd value violates would fail a whole batch of history, not one row.
"""

from __future__ import annotations

from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class WorkerSession(models.Model):
    """One worker connection, from its connect frame to its disconnect.

    A worker that reconnects gets a new row (a new ``session_id``) under the same
    ``worker_id``, so the history of one machine's connections stays readable.
    """

    class Status(models.TextChoices):
        ONLINE = "online", "online"
        OFFLINE = "offline", "offline"

    session_id = models.CharField(max_length=32, unique=True)
    worker_id = models.CharField(max_length=128, db_index=True)
    name = models.CharField(max_length=200, blank=True)
    address = models.CharField(
        max_length=100, blank=True, help_text="ip:port the worker connected from"
    )
    process = models.CharField(
        max_length=200, blank=True, help_text="broker process that held the connection"
    )
    owner = models.CharField(
        max_length=40, blank=True,
        help_text="the credential that registered it (credential:<id>, or anonymous)"
    )
    commands = models.JSONField(default=list, blank=True)
    weight = models.FloatField(default=1.0)
    max_concurrency = models.IntegerField(default=1)
    status = models.CharField(
        max_length=10, choices=Status.choices, default=Status.ONLINE, db_index=True
    )
    connected_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    disconnected_at = models.DateTimeField(null=True, blank=True)
    requests_served = models.IntegerField(default=0)

    class Meta:
        verbose_name = "worker registration"
        ordering = ["-connected_at"]

    def __str__(self) -> str:
        return f"{self.name or self.worker_id} ({self.status})"


class RequestRecord(models.Model):
    """One requester request and its outcome, as answered to the requester."""

    request_id = models.CharField(max_length=128, db_index=True)
    command = models.CharField(max_length=200)
    worker_id = models.CharField(max_length=128, blank=True)
    success = models.BooleanField()
    error = models.TextField(blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    attempts = models.SmallIntegerField(default=1)
    workers_lost = models.SmallIntegerField(
        default=0, help_text="workers that went away (or hung) under it: a poison request "
                             "takes several down")
    code = models.CharField(max_length=32, blank=True,
                            help_text="why it failed (an ErrorCode), empty when it succeeded")
    routing = models.CharField(
        max_length=500, blank=True,
        help_text="how its worker was chosen: strategy, candidates, exclusions, the "
                  "winner's score against the runner-up (one part per placement)")
    requester = models.CharField(
        max_length=100, blank=True,
        help_text='credential name@peer address (the address alone in protected mode), or '
                  '"api" for the HTTP API')
    process = models.CharField(max_length=200, blank=True)
    traceparent = models.CharField(
        max_length=55, blank=True,
        help_text="the W3C trace context its requester sent (version-trace id-span id-flags)")
    started_at = models.DateTimeField(help_text="when the broker received it")
    placed_at = models.DateTimeField(
        null=True, blank=True, help_text="when it was first sent to a worker (empty: never)")
    finished_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "request"
        ordering = ["-finished_at"]
        # The admin's pages of one command, of one worker, of the failures, newest first,
        # read an index range in order instead of sorting (or counting) every matching
        # row. The first serves lookups by command alone too; the last holds failures
        # only, so it costs an insert nothing in the common case.
        indexes = [
            models.Index(fields=["command", "finished_at"], name="request_command_finished"),
            models.Index(fields=["worker_id", "finished_at"], name="request_worker_finished"),
            models.Index(fields=["finished_at"], condition=models.Q(success=False),
                         name="request_failed_finished"),
        ]

    def __str__(self) -> str:
        outcome = "ok" if self.success else (self.error or "failed")
        return f"{self.command} [{self.request_id}]: {outcome}"


class Credential(models.Model):
    """A worker token, a requester API key, or an admin key for the control API.

    Only a SHA-256 digest of the token is stored: tokens are long random strings,
    so a fast hash is enough, and the broker checks one per connection, not per
    message. The token itself is shown once, when it is created.
    """

    class Kind(models.TextChoices):
        WORKER = "worker", "worker token"
        REQUESTER = "requester", "requester API key"
        ADMIN = "admin", "admin key (control API)"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    key_id = models.CharField(max_length=16, unique=True, editable=False,
                              help_text="public part of the token, used to find it")
    digest = models.CharField(max_length=64, editable=False)
    commands = models.JSONField(default=list, blank=True,
                                help_text="commands a requester key may send or a worker "
                                          "token may register (empty: all)")
    max_connections = models.IntegerField(default=0,
                                          help_text="per broker process; 0: no limit")
    max_priority = models.IntegerField(
        default=9, validators=[MinValueValidator(0), MaxValueValidator(9)],
        help_text="the highest priority a requester key's requests get (0-9); one that "
                  "asks for more is served at this one")
    pools = models.JSONField(
        default=list, blank=True,
        help_text="tenancy: the pools a worker token's workers serve, or the one pool a "
                  "requester key is served by (empty: a worker serves keys without a pool; "
                  "a key without a pool reaches every worker)")
    labels = models.JSONField(
        default=dict, blank=True,
        help_text="worker tokens: labels its workers carry whatever they claim, e.g. "
                  '{"gpu": "t4"}')
    version = models.CharField(max_length=64, blank=True,
                               help_text="worker tokens: the version its workers carry")
    max_weight = models.FloatField(
        null=True, blank=True, validators=[MinValueValidator(0.001)],
        help_text="worker tokens: the highest weight its workers get (empty: the broker's cap)")
    active = models.BooleanField(default=True,
                                 help_text="untick to revoke: live connections are closed "
                                           "within seconds")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}{'' if self.active else ', revoked'})"

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        from workers.protocol import POOL_NAME, ProtocolError, parse_labels

        if not isinstance(self.pools, list) or not all(
                isinstance(p, str) and POOL_NAME.fullmatch(p) for p in self.pools):
            raise ValidationError({"pools": "a list of names (letters, digits, . _ -)"})
        if self.kind != self.Kind.WORKER and len(self.pools) > 1:
            raise ValidationError({"pools": "a requester key is served by one pool"})
        try:
            parse_labels(self.labels, "labels", claimed=True)
        except ProtocolError as exc:
            raise ValidationError({"labels": str(exc)}) from None
        if self.kind != self.Kind.WORKER and (self.labels or self.version or self.max_weight):
            raise ValidationError("labels, version and max weight apply to worker tokens")


class Job(models.Model):
    """An accepted request, from its arrival until its answer is no longer kept.

    Written when the request arrives (``queued``), when it is given to a worker
    (``running``) and when it is answered (``done``, with the answer's JSON text);
    deleted ``RESULT_TTL`` seconds after that. A broker that starts (or takes over a
    process that died) serves again what is not done.
    """

    class State(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        DONE = "done", "done"

    key = models.CharField(max_length=64, unique=True,
                           help_text="the request's name inside the broker")
    request_id = models.CharField(max_length=128)
    owner = models.CharField(max_length=40, blank=True,
                             help_text="the credential that sent it (credential:<id>, or "
                                       "anonymous): who may attach to it")
    command = models.CharField(max_length=200)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    #: The request as the broker needs it to run it again: its data and routing (JSON).
    request = models.TextField()
    worker_id = models.CharField(max_length=128, blank=True,
                                 help_text="the worker it was last given to")
    retry_safe = models.BooleanField(default=True, help_text="its command may run twice "
                                                            "(not in the worker's no_retry)")
    process = models.CharField(max_length=200, blank=True,
                               help_text="the broker process that holds it")
    inbox = models.CharField(max_length=200, blank=True,
                             help_text="that process's channel, where its answers go")
    restarts = models.IntegerField(default=0, help_text="broker restarts it lived through")
    created_at = models.DateTimeField(help_text="when the broker received it")
    deadline = models.DateTimeField(help_text="when it times out")
    finished_at = models.DateTimeField(null=True, blank=True)
    answer = models.TextField(blank=True, help_text="its answer, as sent (JSON)")
    task = models.CharField(max_length=200, blank=True, db_default="",
                            help_text="the Django task it runs (module path), if any")
    tried = models.TextField(blank=True, db_default="",
                             help_text="every worker it was given to, in order (a JSON list)")
    started_at = models.DateTimeField(null=True, blank=True,
                                      help_text="when it was first given to a worker")
    attempted_at = models.DateTimeField(null=True, blank=True,
                                        help_text="when it was last given to a worker")
    not_before = models.DateTimeField(null=True, blank=True,
                                      help_text="deferred: not run before then")
    expires_at = models.DateTimeField(
        null=True, blank=True,
        help_text="its answer is kept until then (empty: RESULT_TTL after it)")
    code = models.CharField(max_length=32, blank=True, db_default="",
                            help_text="why it failed (an ErrorCode), once answered")
    progress = models.CharField(
        max_length=300, blank=True, db_default="",
        help_text="a Django task's last progress report: [fraction, message] (JSON)")
    replay_of = models.CharField(max_length=128, blank=True, db_default="",
                                 help_text="the request id of the failed job it runs again")

    class Meta:
        verbose_name = "job"
        ordering = ["-created_at"]
        # Partial indexes: a row is in one of the last two, and leaves the first when it
        # is answered (one index change per state, not one per column).
        indexes = [models.Index(fields=["owner", "request_id"], name="job_owner_request"),
                   models.Index(fields=["process"], condition=~models.Q(state="done"),
                                name="job_unanswered_process"),
                   models.Index(fields=["finished_at"], condition=models.Q(state="done"),
                                name="job_answered_finished"),
                   models.Index(fields=["expires_at"], condition=models.Q(
                       expires_at__isnull=False), name="job_kept_expires"),
                   models.Index(fields=["request_id"], condition=~models.Q(task=""),
                                name="job_task_request")]

    def __str__(self) -> str:
        return f"{self.command} [{self.request_id}]: {self.state}"



class Schedule(models.Model):
    """A periodic job: a command (or a Django task) run on a cron expression or every
    so many seconds, in a time zone. Each due time fires once in a cluster; see
    :mod:`dispatch.schedules`."""

    name = models.CharField(max_length=100, unique=True)
    command = models.CharField(max_length=200, blank=True,
                               help_text="the fleet command it runs")
    task = models.CharField(max_length=200, blank=True,
                            help_text="or the Django task it enqueues (module path)")
    data = models.JSONField(default=dict, blank=True,
                            help_text="the command's data, or the task's keyword arguments")
    select = models.JSONField(default=dict, blank=True,
                              help_text="labels its worker must have")
    timeout = models.FloatField(null=True, blank=True,
                                help_text="seconds each run may take (empty: TIMEOUT)")
    cron = models.CharField(max_length=100, blank=True,
                            help_text='a cron expression, e.g. "*/5 * * * *"')
    every = models.IntegerField(null=True, blank=True,
                                validators=[MinValueValidator(1)],
                                help_text="or an interval in seconds")
    timezone = models.CharField(max_length=64, default="UTC",
                                help_text="the time zone of the cron expression")
    enabled = models.BooleanField(default=True)
    next_run_at = models.DateTimeField(null=True, blank=True, db_index=True,
                                       help_text="the next due time (empty: worked out "
                                                 "when the schedule is next looked at)")
    last_run_at = models.DateTimeField(null=True, blank=True,
                                       help_text="the due time of its last firing")
    last_request_id = models.CharField(max_length=128, blank=True,
                                       help_text="the job its last firing started")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_db(cls, db: Any, field_names: Any, values: Any) -> Schedule:
        from .schedules import remember

        return remember(super().from_db(db, field_names, values))

    def clean(self) -> None:
        from .schedules import check

        check(self)

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Refuses a schedule that cannot fire (ValidationError); a new one, or one whose
        timing or ``enabled`` changed, gets its next due time afresh (the first after
        now; none while disabled). What the brokers write as they fire is left alone."""
        from .schedules import before_save, remember

        super().save(*args, **before_save(self, kwargs))
        remember(self)


class DeadLetter(Job):
    """A job that failed for want of a worker, not for its request (worker_lost,
    lease_expired, timeout, a handler's failure): the admin's *Dead letters*, kept
    ``DEAD_LETTER_TTL`` and run again from there (:mod:`dispatch.replay`)."""

    class Meta:
        proxy = True
        verbose_name = "dead letter"
