"""``manage.py send WORKER_ID ACTION [JSON]``: run an action on one chosen worker."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import RequestCommand


class Command(RequestCommand):
    help = (
        "Sends a request to one worker through the running broker and prints its "
        "response as JSON. Exits non-zero if the request failed."
    )
    data_name = "params"
    data_help = 'Parameters as a JSON object, e.g. \'{"a": 10, "b": 20, "op": "+"}\'.'

    def add_target(self, parser: CommandParser) -> None:
        parser.add_argument("worker_id", help="Id of the worker (see the 'workers' command).")
        parser.add_argument("action", help="Action to run, e.g. get_time.")

    def send(self, client: BrokerClient, data: dict[str, Any], options: dict[str, Any]
             ) -> dict[str, Any]:
        return client.send(options["worker_id"], options["action"], data,
                           timeout=options["timeout"])
