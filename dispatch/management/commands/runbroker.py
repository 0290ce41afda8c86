"""``python manage.py runbroker``: daphne serving the broker on its three ports."""

from __future__ import annotations

import logging

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dispatch import conf
from dispatch.balancing import STRATEGIES

log = logging.getLogger("dispatch.runbroker")


class Command(BaseCommand):
    help = ("Run the broker: worker socket, requester socket and HTTP (admin, /healthz, "
            "control API) served by daphne. Applies database migrations first.")
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None,
                            help=f"interface to listen on (default {conf.get('HOST')}; "
                                 "0.0.0.0 for every interface)")
        parser.add_argument("--worker-port", type=int, default=None,
                            help=f"port for workers (default {conf.get('WORKER_PORT')})")
        parser.add_argument("--requester-port", type=int, default=None,
                            help=f"port for requesters (default {conf.get('REQUESTER_PORT')})")
        parser.add_argument("--http-port", type=int, default=None,
                            help=f"port for HTTP: admin, /healthz, control API "
                                 f"(default {conf.get('HTTP_PORT')})")
        parser.add_argument("--strategy", choices=sorted(STRATEGIES), default=None,
                            help=f"load balancing strategy (default {conf.get('STRATEGY')})")
        parser.add_argument("--timeout", type=float, default=None,
                            help=f"seconds before 'Worker response timeout' "
                                 f"(default {conf.get('TIMEOUT')})")
        parser.add_argument("--no-migrate", action="store_true",
                            help="do not apply database migrations at start")

    def handle(self, *args: object, **options: object) -> None:
        overrides = {
            "HOST": options["host"], "WORKER_PORT": options["worker_port"],
            "REQUESTER_PORT": options["requester_port"], "HTTP_PORT": options["http_port"],
            "STRATEGY": options["strategy"], "TIMEOUT": options["timeout"],
        }
        conf.override(**{k: v for k, v in overrides.items() if v is not None})
        ports = [conf.get("WORKER_PORT"), conf.get("REQUESTER_PORT"), conf.get("HTTP_PORT")]
        if len(set(ports)) != 3:
            raise CommandError(f"The three ports must differ, got {ports}")
        if not options["no_migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        serve(conf.get("HOST"), ports, self.stdout.write)


def serve(host: str, ports: list[int], say: object) -> None:
    """Run daphne until SIGINT/SIGTERM; ``say`` prints the ready line."""
    # daphne installs Twisted's asyncio reactor when imported: import it first.
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server

    from brokersite.asgi import application
    from dispatch.actions import load_action_modules

    load_action_modules()
    worker_port, requester_port, http_port = ports
    endpoints = [e for port in ports
                 for e in build_endpoint_description_strings(host=host, port=port)]
    limit = conf.get("MAX_MESSAGE_BYTES")

    def ready() -> None:
        say(f"Broker ready: workers ws://{host}:{worker_port}  "  # type: ignore[operator]
            f"requesters ws://{host}:{requester_port}  http://{host}:{http_port}  "
            f"(strategy {conf.get('STRATEGY')}, timeout {conf.get('TIMEOUT')}s, "
            f"process {conf.process_name()})")

    Server(
        application=application,
        endpoints=endpoints,
        # Frames a little over our own limit still arrive, so the sender gets a clear
        # error; far larger ones are cut off by daphne with close code 1009.
        websocket_max_message_size=4 * limit + 65536,
        websocket_max_frame_size=4 * limit + 65536,
        ready_callable=ready,
        verbosity=0,
    ).run()
