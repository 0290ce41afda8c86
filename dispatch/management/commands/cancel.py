"""``manage.py cancel REQUEST_ID``: stop a running request, wherever it runs."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand


class Command(BrokerCommand):
    help = ("Cancels a running request by its request_id, whoever sent it and whichever "
            "broker process holds it: its requester is answered 'cancelled' and its worker "
            "is told to stop. Exits non-zero if no such request is running.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("request_id", help="The request's id, as its requester sent it.")
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        found = client.cancel(options["request_id"])
        self.stdout.write(f"Cancelled {found} request(s) with id {options['request_id']}.")
