"""Admin: read-only worker registrations and request history; credentials; schedules.

History is a record of what happened; editing it by hand would only make it lie.
Those admins therefore allow browsing, searching and deleting (to prune old rows),
never adding or changing. Credentials are created and revoked here.

The request history grows by millions of rows, so its pages never read the whole
table: no date hierarchy nor DISTINCT over every row, filters listing the values of
recent rows, exact search on indexed columns, sorting by time only
(``python -m bench.admin_history`` measures it).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator
from urllib.parse import urlencode

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .formats import duration, percent
from .auth import digest, new_token
from .control import services
from .management.base import worker_state
from .models import Credential, DeadLetter, Job, RequestRecord, Schedule, WorkerSession
from .schedules import OWNER as SCHEDULE_OWNER
from .schedules import describe as describe_schedule

#: Rows whose values a history filter lists: the newest ones, never the whole table.
RECENT_ROWS = 10_000
#: Values one history filter lists at most.
FILTER_CHOICES = 100


def changelist_link(model: type, text: str, **query: str) -> SafeString:
    """A link to ``model``'s admin list filtered by ``query``, all of it escaped: worker
    ids and commands come from peers."""
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    return format_html('<a href="{}?{}">{}</a>', url, urlencode(query), text)


# The lists need the width (a worker's row is a dozen columns): the breadcrumbs and the
# index page lead everywhere the menu beside each list did.
admin.site.enable_nav_sidebar = False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Every field shown read-only; no add form, no change form that saves."""

    class Media:
        css = {"all": ("dispatch/admin.css",)}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # False still lets users with "view" permission open the detail page.
        return False


#: The live registry's view of the workers, read once per admin page (per thread).
_live = threading.local()


@contextmanager
def live_workers() -> Iterator[None]:
    """Read the registry once for the page rendered inside (its rows look it up)."""
    _live.workers = {w["worker_id"]: w for w in async_to_sync(services.workers_list)()}
    try:
        yield
    finally:
        del _live.workers


def live_entry(obj: WorkerSession) -> dict[str, Any] | None:
    """The registry's entry for this row's connection, if it is the one online now."""
    live = getattr(_live, "workers", {}).get(obj.worker_id)
    if obj.status != WorkerSession.Status.ONLINE or live is None or \
            live.get("session_id") != obj.session_id:
        return None
    return live


def rendered(response: HttpResponse) -> HttpResponse:
    """Render a template response now, while the live view it reads is set."""
    if hasattr(response, "render"):
        response.render()
    return response


@admin.register(WorkerSession)
class WorkerSessionAdmin(ReadOnlyAdmin):
    # What fits a 1,400 px screen beside the admin's menu; when it connected and left
    # are on the row's page (and connected_at is the date bar above the list).
    list_display = (
        "worker_id", "name", "routing_state", "served", "load", "latency", "error_rate",
        "weight", "address", "process", "seen",
    )
    list_filter = ("status", "process", "connected_at")
    search_fields = ("worker_id", "name", "address", "session_id", "process")
    date_hierarchy = "connected_at"
    ordering = ("-connected_at",)
    actions = ["drain", "undrain"]
    readonly_fields = ("routing_state", "served", "load", "latency", "error_rate")
    fieldsets = (
        (None, {"fields": ("worker_id", "name", "status", "routing_state", "owner",
                           "session_id")}),
        ("Load", {"fields": ("served", "load", "latency", "error_rate")}),
        ("Capacity", {"fields": ("commands", "weight", "max_concurrency")}),
        ("Connection", {"fields": ("address", "process", "connected_at", "last_seen",
                                   "disconnected_at")}),
    )

    @admin.action(description="Drain: no new requests (work in hand finishes)")
    def drain(self, request: HttpRequest, queryset: Any) -> None:
        self._set_draining(request, queryset, True)

    @admin.action(description="Undo drain: back into rotation")
    def undrain(self, request: HttpRequest, queryset: Any) -> None:
        self._set_draining(request, queryset, False)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        with live_workers():
            return rendered(super().changelist_view(request, extra_context))

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: Any = None) -> Any:
        with live_workers():
            return rendered(super().change_view(request, object_id, form_url, extra_context))

    @admin.display(description="state")
    def routing_state(self, obj: WorkerSession) -> SafeString:
        """What the balancer makes of an online worker now: online, draining, probing,
        or ejected until when and why; else what its row says (offline)."""
        live = live_entry(obj)
        text = obj.get_status_display() if live is None else worker_state(live)
        return format_html('<span title="{}">{}</span>', text, text)

    @admin.display(description="served")
    def served(self, obj: WorkerSession) -> SafeString:
        """Requests it answered, linked to its request history (of every connection under
        this worker id): counted by the registry while it is online (the row's own count
        is written when it leaves, so it reads 0 until then)."""
        live = live_entry(obj)
        count = obj.requests_served if live is None else int(live.get("completed") or 0)
        return changelist_link(RequestRecord, str(count), worker_id=obj.worker_id)

    @admin.display(description="load")
    def load(self, obj: WorkerSession) -> str:
        """Requests in flight of the most it may hold, as ``manage.py workers`` shows it."""
        live = live_entry(obj)
        return "-" if live is None else \
            f"{live.get('in_flight') or 0}/{live.get('max_concurrency', obj.max_concurrency)}"

    @admin.display(description="latency")
    def latency(self, obj: WorkerSession) -> str:
        """Its peak-EWMA latency, the balancer's; "-" until it answered once."""
        live = live_entry(obj)
        return duration(live["latency_ms"]) if live and live.get("latency_at") else "-"

    @admin.display(description="seen", ordering="last_seen")
    def seen(self, obj: WorkerSession) -> str:
        """How long ago it last showed life: shorter than a date, and what one looks for."""
        ago = (timezone.now() - obj.last_seen).total_seconds() * 1000
        return f"{duration(max(0.0, ago))} ago"

    @admin.display(description="error rate")
    def error_rate(self, obj: WorkerSession) -> str:
        live = live_entry(obj)
        return "-" if live is None else percent(live.get("error_rate") or 0.0)

    def _set_draining(self, request: HttpRequest, queryset: Any, draining: bool) -> None:
        ids = sorted(set(queryset.filter(status=WorkerSession.Status.ONLINE)
                         .values_list("worker_id", flat=True)))
        done = [w for w in ids if async_to_sync(services.drain)(w, draining)]
        self.message_user(request, f"{'Drained' if draining else 'Back in rotation'}: "
                                   f"{', '.join(done) or 'no online worker selected'}")


class TookDownWorkers(admin.SimpleListFilter):
    """Poison requests: those whose workers died (or hung) under them."""

    title = "workers lost under it"
    parameter_name = "lost"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("0", "none"), ("1", "one or more"), ("2", "two or more (poison?)")]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        if self.value() == "0":
            return queryset.filter(workers_lost=0)
        if self.value() in ("1", "2"):
            return queryset.filter(workers_lost__gte=int(self.value()))
        return queryset


class RecentValuesFilter(admin.AllValuesFieldListFilter):
    """Lists the values of the newest RECENT_ROWS requests, not of the whole table.

    Django's own filter runs a DISTINCT over every row for each page: seconds on a
    million. Recent values are the ones looked for; an older one still filters by URL
    (``?command=resize``), and a selected value is always listed.
    """

    def __init__(self, field: Any, request: HttpRequest, params: dict[str, Any],
                 model: type, model_admin: Any, field_path: str) -> None:
        super().__init__(field, request, params, model, model_admin, field_path)
        # Distinct here, not in SQL: given a DISTINCT, SQLite prefers reading a whole
        # index that is in the field's order to the range of recent rows.
        recent = newest_requests(request, model_admin.get_queryset(request)) \
            .order_by().values_list(field.name, flat=True)
        values = sorted(set(recent) - {""})[:FILTER_CHOICES]
        self.lookup_choices = sorted({*values, *(self.lookup_val or ())})


def newest_requests(request: HttpRequest, rows: QuerySet) -> QuerySet:
    """``rows`` from the finish time of the RECENT_ROWS-th newest on: an index range.

    (Not ``id IN (newest ids)``, which PostgreSQL joins against the whole table.) The
    time is looked up once per page, for all the filters.
    """
    if not hasattr(request, "_newest_since"):
        since = rows.values_list("finished_at", flat=True)[RECENT_ROWS - 1:RECENT_ROWS]
        request._newest_since = next(iter(since), None)  # type: ignore[attr-defined]
    since = request._newest_since  # type: ignore[attr-defined]
    return rows if since is None else rows.filter(finished_at__gte=since)


@admin.register(RequestRecord)
class RequestRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id", "command", "outcome", "worker", "latency", "tries", "requester",
        "process", "finished",
    )
    list_filter = ("success", ("code", RecentValuesFilter), TookDownWorkers,
                   ("command", RecentValuesFilter), ("process", RecentValuesFilter),
                   "finished_at")
    search_fields = ("request_id", "worker_id", "command")  # exact: get_search_results
    search_help_text = "A request id, a worker id or a command, exactly."
    ordering = ("-finished_at",)
    # Any other order would sort the whole table for one page.
    sortable_by = ("finished",)
    # The default count(*) for the paginator is slow on a large history table; so are
    # facet counts, one per filter choice over the whole table.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    readonly_fields = ("timeline", "worker", "latency")
    fieldsets = (
        (None, {"fields": ("request_id", "command", "requester", "process", "traceparent")}),
        ("Timeline", {"fields": ("timeline",)}),
        ("Outcome", {"fields": ("success", "code", "error", "latency")}),
        ("How its worker was chosen", {"fields": ("routing",)}),
    )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        """The rows of the request id, else of the worker id, else of the command.

        Exact and on one indexed column at a time: the default substring search reads
        every row, and an OR of columns cannot walk the index in time order.
        """
        term = search_term.strip()
        if not term:
            return queryset, False
        for column in ("request_id", "worker_id"):
            found = queryset.filter(**{column: term})
            if found.exists():
                return found, False
        return queryset.filter(command=term), False

    @admin.display(description="worker")
    def worker(self, obj: RequestRecord) -> str:
        """The worker that answered, linked to its registrations."""
        if not obj.worker_id:
            return "-"
        return changelist_link(WorkerSession, obj.worker_id, worker_id=obj.worker_id)

    @admin.display(description="latency")
    def latency(self, obj: RequestRecord) -> str:
        return duration(obj.latency_ms)

    @admin.display(description="outcome")
    def outcome(self, obj: RequestRecord) -> SafeString:
        """ok, or its error code (the text is on its page)."""
        if obj.success:
            return format_html('<span class="ok">{}</span>', "ok")
        return format_html('<span class="failed" title="{}">{}</span>', obj.error,
                           obj.code or "failed")

    @admin.display(description="tries")
    def tries(self, obj: RequestRecord) -> str:
        """Workers it was sent to, and how many of them were lost under it."""
        return f"{obj.attempts}, {obj.workers_lost} lost" if obj.workers_lost \
            else str(obj.attempts)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, obj: RequestRecord) -> str:
        """Its time to the millisecond; the date only when it is not today's."""
        return _moment(obj.finished_at, timezone.now())

    @admin.display(description="steps")
    def timeline(self, obj: RequestRecord) -> SafeString:
        """Submitted, placed, answered: when, by whom, and how long each step took."""
        steps: list[tuple[Any, str, str]] = [("submitted", _moment(obj.started_at), "")]
        answered_after = obj.started_at
        if obj.placed_at is None:
            steps.append(("never placed on a worker", "-", ""))
        else:
            first = "first placed on a worker" if obj.attempts > 1 else "placed on a worker"
            steps.append((first, _moment(obj.placed_at, obj.started_at),
                          _after(obj.started_at, obj.placed_at)))
            answered_after = obj.placed_at
        if obj.attempts > 1 or obj.workers_lost:
            steps.append((f"{obj.attempts} attempts, {obj.workers_lost} worker(s) lost "
                          f"under it", "", ""))
        outcome = "ok" if obj.success else (obj.code or "failed")
        by = format_html(" by {}", self.worker(obj)) if obj.worker_id else ""
        steps.append((format_html("answered{}: {}", by, outcome),
                      _moment(obj.finished_at, obj.started_at),
                      _after(answered_after, obj.finished_at)))
        total = obj.latency_ms if obj.latency_ms is not None else \
            (obj.finished_at - obj.started_at).total_seconds() * 1000
        steps.append(("total", "", duration(total)))
        return format_html('<table class="timeline">{}</table>', format_html_join(
            "", "<tr><th>{}</th><td>{}</td><td>{}</td></tr>", steps))


def _moment(when: datetime, day_of: datetime | None = None) -> str:
    """Local time to the millisecond; with its date unless that is ``day_of``'s."""
    local = timezone.localtime(when)
    text = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}"
    if day_of is not None and timezone.localtime(day_of).date() == local.date():
        return text
    return f"{local:%Y-%m-%d} {text} {local:%Z}"


def _after(earlier: datetime, later: datetime) -> str:
    ms = (later - earlier).total_seconds() * 1000
    return ("+" if ms >= 0 else "") + duration(ms)


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    """The job store: requests not answered yet (and, a while, those just answered)."""

    list_display = ("request_id", "command", "state", "worker_id", "restarts", "process",
                    "created_at", "deadline", "replayed_from")
    list_filter = ("state", "command")
    search_fields = ("request_id", "key", "worker_id")
    ordering = ("-created_at",)
    actions = ["cancel"]
    exclude = ("request", "answer")
    readonly_fields = ("answer_text",)

    @admin.action(description="Cancel: answered 'cancelled' now, its worker told to stop")
    def cancel(self, request: HttpRequest, queryset: Any) -> None:
        ids = sorted(set(queryset.exclude(state=Job.State.DONE)
                         .values_list("request_id", flat=True)))
        by = f"staff user '{request.user.get_username()}' in the admin"
        done = [r for r in ids if async_to_sync(services.cancel)(r, by)]
        self.message_user(request, f"Cancelled: {', '.join(done) or 'none of those runs'}")

    @admin.display(description="answer")
    def answer_text(self, obj: Job) -> str:
        return obj.answer or "-"

    @admin.display(description="run again from")
    def replayed_from(self, obj: Job) -> SafeString | str:
        if not obj.replay_of:
            return "-"
        url = reverse("admin:dispatch_deadletter_changelist")
        return format_html('<a href="{}?{}">{}</a>', url, urlencode({"q": obj.replay_of}),
                           obj.replay_of)


@admin.register(DeadLetter)
class DeadLetterAdmin(JobAdmin):
    """Jobs that failed for want of a worker (retries exhausted, poison, worker lost,
    hung, timed out, a handler's failure): run them again from here. (A job's page, as
    the Jobs' list shows it.)"""

    list_display = ("request_id", "command", "code", "error", "worker_id", "tried",
                    "finished_at", "runs_again")
    list_filter = ("code", "command")
    search_fields = ("request_id", "worker_id", "task")
    ordering = ("-finished_at",)
    actions = ["run_again"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeadLetter]:
        from .core.store import DEAD_LETTERS

        return super().get_queryset(request).filter(state=Job.State.DONE,
                                                    code__in=DEAD_LETTERS)

    @admin.display(description="error")
    def error(self, obj: Job) -> str:
        from workers import protocol

        try:
            return str(protocol.loads_object(obj.answer).get("error") or "")[:200]
        except protocol.ProtocolError:
            return "-"

    @admin.display(description="run again as")
    def runs_again(self, obj: Job) -> SafeString | str:
        again = list(Job.objects.filter(replay_of=obj.request_id).values_list(
            "request_id", flat=True)[:5])
        if not again:
            return "-"
        url = reverse("admin:dispatch_job_changelist")
        return format_html_join(", ", '<a href="{}?{}">{}</a>',
                                ((url, urlencode({"q": rid}), rid) for rid in again))

    @admin.action(description="Run again: same command and data, a new request id")
    def run_again(self, request: HttpRequest, queryset: Any) -> None:
        from .replay import NotReplayable, replay

        started, refused = [], []
        for job in queryset:
            try:
                started.append(f"{job.request_id} as {replay(job)}")
            except (NotReplayable, RuntimeError) as exc:
                refused.append(str(exc))
        if started:
            self.message_user(request, f"Running again: {', '.join(started)}")
        if refused:
            self.message_user(request, f"Not run again: {'; '.join(refused)}",
                              level=messages.WARNING)


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    """Create and revoke credentials; a new one's token is shown once, after saving."""

    list_display = ("name", "kind", "active", "key_id", "pools", "max_connections",
                    "max_priority", "created_at")
    list_filter = ("kind", "active")
    search_fields = ("name", "key_id")
    readonly_fields = ("key_id", "created_at")
    fields = ("name", "kind", "commands", "pools", "labels", "version", "max_weight",
              "max_connections", "max_priority", "active", "key_id", "created_at")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Revoke (untick "active") instead: deleting every credential would return the
        # broker to protected mode, which `manage.py token delete` does only when asked.
        return False

    def save_model(self, request: HttpRequest, obj: Credential, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, obj.key_id = new_token(obj.kind)
        obj.digest = digest(token)
        super().save_model(request, obj, form, change)
        messages.warning(request, f"Token for '{obj.name}' (copy it now, it is not shown "
                                  f"again): {token}")


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    """Periodic jobs: a command run on a cron expression or every N seconds. Each firing
    is a job (the Jobs list) answered into the request history; see docs/scheduling.md."""

    list_display = ("name", "runs", "when", "timezone", "enabled", "next_run_at",
                    "last_run_at", "last_request")
    list_editable = ("enabled",)
    list_filter = ("enabled",)
    search_fields = ("name", "command", "task")
    readonly_fields = ("next_run_at", "last_run_at", "last_request", "created_at")
    fieldsets = (
        (None, {"fields": ("name", "enabled")}),
        ("What it runs", {"fields": ("command", "task", "data", "select", "timeout")}),
        ("When", {"fields": ("cron", "every", "timezone"),
                  "description": "A cron expression in the time zone (5 fields, or 6 with "
                                 "seconds first), or every N seconds (on multiples of N "
                                 "since 1970-01-01 UTC). A due time the broker missed "
                                 "(it was down) fires once, however many passed."}),
        ("Firings", {"fields": ("next_run_at", "last_run_at", "last_request", "created_at")}),
    )

    @admin.display(description="runs")
    def runs(self, obj: Schedule) -> str:
        return describe_schedule(obj)[0]

    @admin.display(description="when")
    def when(self, obj: Schedule) -> str:
        return describe_schedule(obj)[1]

    @admin.display(description="last request")
    def last_request(self, obj: Schedule) -> SafeString | str:
        """Its last firing: the job while the job store keeps it, else its history."""
        rid = obj.last_request_id
        if not rid:
            return "-"
        job = Job.objects.filter(request_id=rid, owner=SCHEDULE_OWNER).values_list(
            "pk", flat=True).first()
        if job is not None:
            return format_html('<a href="{}">{}</a>',
                               reverse("admin:dispatch_job_change", args=[job]), rid)
        return changelist_link(RequestRecord, rid, q=rid)
