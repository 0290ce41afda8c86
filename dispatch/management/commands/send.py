"""``manage.py send WORKER_ID ACTION [JSON]``: run an action on one chosen worker."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand, parse_json, seconds


class Command(BrokerCommand):
    help = (
        "Sends a request to one worker through the running broker and prints its "
        "response as JSON. Exits non-zero if the request failed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("worker_id", help="Id of the worker (see the 'workers' command).")
        parser.add_argument("action", help="Action to run, e.g. get_time.")
        parser.add_argument(
            "params", nargs="?",
            help='Parameters as a JSON object, e.g. \'{"a": 10, "b": 20, "op": "+"}\'.',
        )
        parser.add_argument(
            "--timeout", type=seconds, metavar="SECONDS",
            help="Seconds to wait for the worker (default: the broker's TIMEOUT).",
        )
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        params = parse_json(options["params"], "PARAMS")
        response = client.send(options["worker_id"], options["action"], params,
                               timeout=options["timeout"])
        self.write_response(response, options["action"])
