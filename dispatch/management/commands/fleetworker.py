"""``manage.py fleetworker``: a worker inside this Django project that runs its tasks.

It dials out to the broker's worker socket like any worker (so a Django box behind
NAT can run tasks), serves ``task:<queue>`` for each queue, and runs each task it is
sent by its module path, in this project (models, settings and all).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workers.__main__ import serve
from workers.address import broker_url, default_token
from workers.client import Worker, default_name
from workers.protocol import label

from ... import conf


class Command(BaseCommand):
    help = ("Runs a worker that executes this project's Django tasks (TASKS backend "
            "dispatch.tasks.FleetBackend): it connects to the broker's worker socket, "
            "serves the queues given, reconnects when the broker goes away, and stops "
            "gracefully on Ctrl-C or SIGTERM (finishing its tasks first).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("url", nargs="?",
                            help="the broker's worker socket, e.g. ws://broker:8765/ "
                                 "(default: ws://127.0.0.1:<BROKER_WORKER_PORT>/)")
        parser.add_argument("--queue", action="append", default=[], metavar="NAME",
                            help="a queue whose tasks this worker runs; repeatable "
                                 "(default: every queue of the FleetBackend TASKS "
                                 "backends, else 'default')")
        parser.add_argument("--tasks", action="append", default=[], metavar="MODULE",
                            help="a module of tasks to load besides each installed app's "
                                 "tasks module and DISPATCH_TASK_MODULES; repeatable. A task "
                                 "of a module not loaded is refused, never imported")
        parser.add_argument("--token", default=default_token(),
                            help="worker token, when the broker has credentials "
                                 "(default $BROKER_TOKEN)")
        parser.add_argument("--name", help="name shown in the broker's lists")
        parser.add_argument("--max-concurrency", type=int, default=4,
                            help="tasks run at once at most, each in a thread (default 4)")
        parser.add_argument("--label", action="append", default=[], type=label,
                            metavar="NAME=VALUE",
                            help="a label tasks' queues may select this worker by "
                                 "(OPTIONS['SELECT']); repeatable")
        parser.add_argument("--log-level", default="INFO",
                            choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    def handle(self, *args: Any, **options: Any) -> None:
        from ...tasks.known import load_task_modules
        from ...tasks.runner import registry_for

        logging.basicConfig(level=options["log_level"],
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        queues = options["queue"] or configured_queues()
        try:
            modules = load_task_modules(options["tasks"])
        except ImportError as exc:
            raise CommandError(f"cannot load tasks: {exc}") from None
        url = options["url"] or broker_url("127.0.0.1", conf.get("WORKER_PORT"))
        name = options["name"] or default_name()
        try:
            worker = Worker(url, name=name, token=options["token"],
                            max_concurrency=options["max_concurrency"],
                            labels=dict(options["label"]), registry=registry_for(queues, name))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        logging.getLogger("dispatch.tasks").info(
            "fleetworker %s runs the tasks of queue(s) %s from %s (tasks of: %s)",
            worker.name, ", ".join(queues), url, ", ".join(modules) or "no module")
        try:
            asyncio.run(serve(worker))
        except asyncio.CancelledError:
            raise CommandError("stopped at once (second signal)") from None


def configured_queues() -> list[str]:
    """The queues of this project's FleetBackend TASKS backends."""
    from django.conf import settings

    queues: list[str] = []
    for params in (getattr(settings, "TASKS", None) or {}).values():
        if params.get("BACKEND", "").rsplit(".", 1)[-1] == "FleetBackend":
            queues += [q for q in params.get("QUEUES") or ["default"] if q not in queues]
    return queues or ["default"]
