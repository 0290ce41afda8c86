"""Settings for the broker, read from the environment.

Unset, everything is the embedded default: one process, the in-memory channel
layer and SQLite. ``REDIS_URL`` (or ``REDIS_SENTINELS``, see dispatch/redisconn.py)
switches the channel layer and the worker registry to Redis; ``DATABASE_URL``
replaces SQLite (``postgres://user:pw@host:5432/db?sslmode=require``, parsed by
dj-database-url). The broker's own ``BROKER_*`` settings are validated by
dispatch/conf.py when the app starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
import django

from dispatch.redis.connection import RedisTarget

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def database_from_url(url: str) -> dict:
    """Django's database settings for ``url``; SQLite in WAL mode.

    WAL: the history writer's commits skip most fsyncs, and the admin can read
    while it writes.
    """
    config = dj_database_url.parse(url)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config.setdefault("OPTIONS", {})["init_command"] = (
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
    return config


#: Good enough on one machine; runbroker refuses it when DEBUG is off and the broker
#: listens beyond loopback (sessions and CSRF tokens of the admin depend on it).
DEVELOPMENT_SECRET_KEY = "insecure-dev-key-set-DJANGO_SECRET_KEY-in-production"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", DEVELOPMENT_SECRET_KEY)
DEBUG = env_bool("DJANGO_DEBUG")
# Host names the HTTP port answers to. Loopback names unless set: a page whose own name
# is made to resolve to 127.0.0.1 (DNS rebinding) must not reach the admin or the API.
ALLOWED_HOSTS = [h.strip() for h in os.environ.get(
    "DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()]

INSTALLED_APPS = [
    "daphne",
    "dispatch",  # before the admin: its admin/base_site.html adds the broker's icon
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
]
if django.VERSION < (6, 0):  # the tasks API's backport: its system checks and signals
    INSTALLED_APPS.append("django_tasks")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "brokersite.urls"
ASGI_APPLICATION = "brokersite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": database_from_url(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Django tasks run on the fleet (docs/django.md): a plain task on a `manage.py
# fleetworker` serving its queue, a @task(command=...) on any worker offering it.
TASKS = {"default": {"BACKEND": "dispatch.tasks.FleetBackend",
                     "QUEUES": os.environ.get("BROKER_TASK_QUEUES", "default").split(",")}}
# Modules of tasks a broker and a fleetworker load at start, besides each app's tasks
# module (a task's path comes from peers: only tasks of loaded modules are run).
DISPATCH_TASK_MODULES = [m for m in os.environ.get("BROKER_TASK_MODULES", "").split(",") if m]
# Where Django code that is not a broker process sends jobs (dispatch.fleet): the
# broker's requester socket, and a requester key once credentials exist.
DISPATCH_FLEET = {"URL": os.environ.get("BROKER_FLEET_URL", ""),
                  "KEY": os.environ.get("BROKER_FLEET_KEY", "")}

#: Where Redis is (REDIS_URL, or REDIS_SENTINELS and REDIS_SENTINEL_MASTER); falsy: none.
REDIS = RedisTarget.from_env(os.environ)
_PREFIX = os.environ.get("BROKER_REDIS_PREFIX", "dispatch")
try:
    _HEARTBEAT = float(os.environ.get("BROKER_HEARTBEAT_INTERVAL", "5"))
except ValueError:
    _HEARTBEAT = 5.0  # dispatch/conf.py refuses the value itself, saying why
if REDIS:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis's layer, in fewer round trips per message.
            "BACKEND": "dispatch.redis.layer.RedisChannelLayer",
            # channels-redis waits up to 5 s for a message; redis-py 8 gives up reading
            # after 5 s by default, which would turn every quiet wait into an "outage".
            "CONFIG": {"hosts": [REDIS.layer_host(socket_timeout=30, socket_connect_timeout=5)],
                       "capacity": 10_000, "expiry": 60,
                       # Each dispatcher re-joins the broadcast group every heartbeat
                       # interval: a dead process's inbox leaves it within minutes, not
                       # channels-redis's default of a day.
                       "group_expiry": int(max(5, 10 * _HEARTBEAT)),
                       "prefix": _PREFIX + ":asgi",
                       # msgpack, and integers beyond 64 bits (dispatch.redis.layer).
                       "serializer_format": "dispatch"},
        }
    }
else:
    # A process's inbox may hold thousands of forwarded requests and answers: the
    # default capacity of 100 per channel would refuse them long before it is busy.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 10_000, "expiry": 60},
        }
    }

#: The broker's own settings; dispatch/conf.py documents each and holds the defaults.
BROKER = {
    key[len("BROKER_"):]: value
    for key, value in os.environ.items()
    if key.startswith("BROKER_")
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TZ", "UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"},
    },
    "filters": {"redact": {"()": "dispatch.logsafe.RedactTokens"},
                "throttle": {"()": "dispatch.logsafe.Throttle"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                             "filters": ["redact"]},
                 # What any HTTP peer can make Django log (bad Host headers, 4xx):
                 # a few lines a second, short, no tracebacks.
                 "peer_driven": {"class": "logging.StreamHandler", "formatter": "plain",
                                 "filters": ["redact", "throttle"]}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "dispatch": {"level": os.environ.get("BROKER_LOG_LEVEL", "INFO").upper()},
        "django.channels.server": {"level": "WARNING"},
        "django.security": {"handlers": ["peer_driven"], "propagate": False},
        "django.request": {"handlers": ["peer_driven"], "propagate": False},
    },
}
