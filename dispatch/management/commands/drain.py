"""``manage.py drain WORKER_ID``: take a worker out of rotation without dropping its work."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...control.client import BrokerClient
from ..base import BrokerCommand


class Command(BrokerCommand):
    help = ("Takes a worker out of rotation: it gets no new requests, and those it holds "
            "finish. Use before stopping or upgrading a worker machine; --undo puts it back.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("worker_id", help="the worker's id (see: manage.py workers)")
        parser.add_argument("--undo", action="store_true",
                            help="put the worker back into rotation")
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        client.drain(options["worker_id"], not options["undo"])
        state = "back in rotation" if options["undo"] else "draining: no new requests"
        self.stdout.write(f"Worker {options['worker_id']} is {state}.")
