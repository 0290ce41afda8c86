"""``manage.py call COMMAND [JSON]``: what a requester does, from the shell."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand, parse_json, seconds


class Command(BrokerCommand):
    help = (
        "Runs a command on the best available worker, as a requester would, and "
        "prints the response as JSON. Exits non-zero if the request failed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("command", help="Command to run, e.g. echo.")
        parser.add_argument(
            "data", nargs="?",
            help='Its data as a JSON object, e.g. \'{"message": "Hello World"}\'.',
        )
        parser.add_argument(
            "--timeout", type=seconds, metavar="SECONDS",
            help="Seconds to wait for an answer (default: the broker's TIMEOUT).",
        )
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        data = parse_json(options["data"], "DATA")
        response = client.call(options["command"], data, timeout=options["timeout"])
        self.write_response(response, options["command"])
