"""``manage.py call COMMAND [JSON]``: what a requester does, from the shell."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import RequestCommand, add_routing, routing


class Command(RequestCommand):
    help = (
        "Runs a command on the best available worker, as a requester would, and "
        "prints the response as JSON. Exits non-zero if the request failed."
    )

    def add_target(self, parser: CommandParser) -> None:
        parser.add_argument("command", help="Command to run, e.g. echo.")
        add_routing(parser)

    def send(self, client: BrokerClient, data: dict[str, Any], options: dict[str, Any]
             ) -> dict[str, Any]:
        return client.call(options["command"], data, timeout=options["timeout"],
                           **routing(options))
