"""Admin: read-only worker registrations and request history; credentials.

History is a record of what happened; editing it by hand would only make it lie.
Those admins therefore allow browsing, searching and deleting (to prune old rows),
never adding or changing. Credentials are created and revoked here.
"""

from __future__ import annotations

import threading
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.http import HttpRequest

from .auth import digest, new_token
from .control import services
from .management.base import worker_state
from .models import Credential, RequestRecord, WorkerSession


class ReadOnlyAdmin(admin.ModelAdmin):
    """Every field shown read-only; no add form, no change form that saves."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # False still lets users with "view" permission open the detail page.
        return False


#: The live registry's view of the workers, read once per admin page (per thread).
_live = threading.local()


@admin.register(WorkerSession)
class WorkerSessionAdmin(ReadOnlyAdmin):
    list_display = (
        "worker_id", "name", "status", "routing_state", "address", "process",
        "max_concurrency", "weight", "requests_served", "connected_at", "last_seen",
        "disconnected_at",
    )
    list_filter = ("status", "process", "connected_at")
    search_fields = ("worker_id", "name", "address", "session_id", "process")
    date_hierarchy = "connected_at"
    ordering = ("-connected_at",)
    actions = ["drain", "undrain"]

    @admin.action(description="Drain: no new requests (work in hand finishes)")
    def drain(self, request: HttpRequest, queryset: Any) -> None:
        self._set_draining(request, queryset, True)

    @admin.action(description="Undo drain: back into rotation")
    def undrain(self, request: HttpRequest, queryset: Any) -> None:
        self._set_draining(request, queryset, False)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        _live.workers = {w["worker_id"]: w for w in async_to_sync(services.workers_list)()}
        try:
            response = super().changelist_view(request, extra_context)
            if hasattr(response, "render"):  # rendered here, while the live view is set
                response.render()
            return response
        finally:
            del _live.workers

    @admin.display(description="routing")
    def routing_state(self, obj: WorkerSession) -> str:
        """What the balancer makes of an online worker now: online, draining, probing,
        or ejected until when and why."""
        live = getattr(_live, "workers", {}).get(obj.worker_id)
        if obj.status != WorkerSession.Status.ONLINE or live is None or \
                live.get("session_id") != obj.session_id:
            return "-"
        return worker_state(live)

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


@admin.register(RequestRecord)
class RequestRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "request_id", "command", "success", "code", "worker_id", "latency_ms", "attempts",
        "workers_lost", "requester", "process", "finished_at",
    )
    # The detail page shows every field, ``routing`` (how its worker was chosen) too.
    list_filter = ("success", "code", TookDownWorkers, "command", "process", "finished_at")
    search_fields = ("request_id", "command", "worker_id", "requester", "error")
    date_hierarchy = "finished_at"
    ordering = ("-finished_at",)
    # The default count(*) for the paginator is slow on a large history table.
    show_full_result_count = False


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    """Create and revoke credentials; a new one's token is shown once, after saving."""

    list_display = ("name", "kind", "active", "key_id", "max_connections", "created_at")
    list_filter = ("kind", "active")
    search_fields = ("name", "key_id")
    readonly_fields = ("key_id", "created_at")
    fields = ("name", "kind", "commands", "max_connections", "active", "key_id", "created_at")

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
