"""What the control commands share: broker options, the client, JSON and table output.

Each command is a thin edge: parse arguments, call one :class:`BrokerClient`
method, print. Failures to reach or satisfy the broker become ``CommandError`` here,
once, so every command exits non-zero with the same clear message.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from django.core.management.base import BaseCommand, CommandError, CommandParser

from workers.protocol import label

from ..control.client import BrokerClient, ControlError, default_base_url, default_token


class BrokerCommand(BaseCommand):
    """A management command that acts through the running broker's HTTP API.

    Subclasses implement :meth:`handle_broker`; ``--broker`` and ``--token`` are added
    here. System checks are skipped: these commands touch neither models nor the
    database, and an operator's shell should not need a working one to use them.
    """

    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--broker", metavar="URL",
            help="Base URL of the broker's HTTP port (default: $BROKER_URL, "
                 "else http://127.0.0.1:<BROKER_HTTP_PORT>).",
        )
        parser.add_argument(
            "--token",
            help="Bearer token for the control API (default: $BROKER_API_TOKEN). "
                 "Needed once credentials exist (an admin key), or from another machine.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        client = self.get_client(options)
        try:
            self.handle_broker(client, **options)
        except ControlError as exc:
            raise CommandError(str(exc)) from exc

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        raise NotImplementedError("subclasses of BrokerCommand must provide handle_broker()")

    def get_client(self, options: dict[str, Any]) -> BrokerClient:
        token = options.get("token")
        return BrokerClient(
            options.get("broker") or default_base_url(),
            token=default_token() if token is None else token,
        )

    def write_json(self, value: Any) -> None:
        self.stdout.write(dumps(value))

    def write_response(self, response: dict[str, Any], what: str) -> None:
        """Print a requester-style response; raise if it says the request failed."""
        self.write_json(response)
        if not response.get("success"):
            raise CommandError(f"{what} failed: {response.get('error') or 'unknown error'}")


class RequestCommand(BrokerCommand):
    """A command that sends one request through the broker and prints its answer.

    Subclasses add their leading arguments in :meth:`add_target` and send in
    :meth:`send`; the JSON object argument (``data_name``) and ``--timeout`` are here.
    """

    data_name = "data"
    data_help = 'Its data as a JSON object, e.g. \'{"message": "Hello World"}\'.'

    def add_target(self, parser: CommandParser) -> None:
        raise NotImplementedError

    def send(self, client: BrokerClient, data: dict[str, Any], options: dict[str, Any]
             ) -> dict[str, Any]:
        raise NotImplementedError

    def add_arguments(self, parser: CommandParser) -> None:
        self.add_target(parser)
        parser.add_argument(self.data_name, nargs="?", help=self.data_help)
        parser.add_argument(
            "--timeout", type=seconds, metavar="SECONDS",
            help="Seconds to wait for an answer (default: the broker's TIMEOUT).",
        )
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        data = parse_json(options[self.data_name], self.data_name.upper())
        response = self.send(client, data, options)
        self.write_response(response, options.get("command") or options["action"])


# --------------------------------------------------------------------------- parsing


def parse_json(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from the command line; ``None`` or empty means ``{}``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{what} must be a JSON object, like {{\"key\": \"value\"}}")
    return value


def parse_message(text: str) -> Any:
    """A broadcast message: JSON if it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_routing(parser: CommandParser) -> None:
    """``--select`` and ``--affinity``: what a request may ask of its worker."""
    parser.add_argument("--select", type=label, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="Only workers with this label (repeatable: all must match).")
    parser.add_argument("--affinity", metavar="KEY",
                        help="Affinity key: requests with one key go to the same worker.")


def routing(options: dict[str, Any]) -> dict[str, Any]:
    """The routing fields of a request body from ``add_routing``'s options."""
    out: dict[str, Any] = {}
    if options.get("select"):
        out["select"] = dict(options["select"])
    if options.get("affinity"):
        out["affinity"] = options["affinity"]
    return out


def seconds(text: str) -> float:
    """argparse type for ``--timeout``: refuses zero and negatives, which never answer."""
    value = float(text)
    if value <= 0:
        raise ValueError(text)
    return value


# --------------------------------------------------------------------------- output


def worker_state(w: dict[str, Any]) -> str:
    """online / draining / probing, or "ejected until 12:04:05 (why)"."""
    state = str(w.get("state") or ("draining" if w.get("draining") else "online"))
    if state == "ejected":
        until = time.strftime("%H:%M:%S", time.localtime(w.get("ejected_until") or 0))
        state += f" until {until} ({w.get('ejected_why') or '?'})"
    return state


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)


WORKER_COLUMNS = ("ID", "NAME", "STATE", "PROCESS", "LOAD", "WEIGHT", "DONE", "ERRORS",
                  "LATENCY", "COMMANDS")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """An aligned text table with a header row (the last column is not padded)."""
    lines = [header, *rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)),
                                row[-1]]).rstrip() for row in lines)


def format_workers(workers: Iterable[dict[str, Any]]) -> str:
    """The workers as an aligned text table, one row each; a sentence if none."""
    rows = [_worker_row(w) for w in workers]
    return table(WORKER_COLUMNS, rows) if rows else "No workers online."


def _worker_row(w: dict[str, Any]) -> tuple[str, ...]:
    labels = w.get("labels") or {}
    name = str(w.get("name") or "") + (
        f" [{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}]" if labels else "")
    latency = w.get("latency_ms")
    return (
        str(w.get("worker_id", "")),
        name,
        worker_state(w),
        str(w.get("process") or ""),
        f"{w.get('in_flight', 0)}/{w.get('max_concurrency', '?')}",
        f"{w.get('weight', 1):g}",
        str(w.get("completed", 0)),
        str(w.get("errors", 0)),
        f"{latency:.1f} ms" if isinstance(latency, (int, float)) else "-",
        ",".join(w.get("commands") or []),
    )
