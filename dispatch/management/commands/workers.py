"""``manage.py workers``: who is online and how loaded, across all broker processes."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand, format_workers


class Command(BrokerCommand):
    help = "Lists the workers online at the running broker, with their load."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json", action="store_true",
            help="Print the full worker records as JSON instead of a table.",
        )
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        workers = client.workers()
        if options["json"]:
            self.write_json(workers)
        else:
            self.stdout.write(format_workers(workers))
