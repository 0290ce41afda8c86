"""``manage.py broadcast MESSAGE``: a notification to every online worker."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand, parse_message


class Command(BrokerCommand):
    help = "Sends a notification to every worker connected to the running broker."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "message", nargs="+",
            help="The message: JSON (e.g. '{\"kind\": \"reload\"}') or plain text; "
                 "several words are joined with spaces.",
        )
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        count = client.broadcast(parse_message(" ".join(options["message"])))
        self.stdout.write(f"Sent to {count} worker{'' if count == 1 else 's'}.")
