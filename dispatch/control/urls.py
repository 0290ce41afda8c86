from django.urls import path

from . import pages, views

urlpatterns = [
    path("", pages.home, name="home"),
    path("dashboard/", pages.dashboard, name="dashboard"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics_view, name="metrics"),
    path("api/workers", views.workers, name="api-workers"),
    path("api/commands", views.commands, name="api-commands"),
    path("api/broadcast", views.broadcast, name="api-broadcast"),
    path("api/send", views.send, name="api-send"),
    path("api/drain", views.drain, name="api-drain"),
    path("api/call", views.call, name="api-call"),
    path("api/explain", views.explain, name="api-explain"),
    path("api/cancel", views.cancel, name="api-cancel"),
    path("api/requests/<str:request_id>", views.request_status, name="api-request"),
]
