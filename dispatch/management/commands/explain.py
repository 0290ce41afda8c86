"""``manage.py explain COMMAND [JSON]``: how the next request would be routed, now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from ...formats import duration, percent
from ...control.client import BrokerClient
from ..base import BrokerCommand, add_routing, parse_json, routing

COLUMNS = ("", "WORKER", "NAME", "STATE", "LOAD", "WEIGHT", "LATENCY", "ERRORS", "SCORE", "LABELS")


class Command(BrokerCommand):
    help = ("A dry run of routing: shows which worker the broker would choose for COMMAND "
            "now, and why (strategy, candidates, exclusions, scores), without sending "
            "anything. JSON may hold a request's routing fields, e.g. "
            "'{\"select\": {\"gpu\": \"a100\"}, \"affinity\": \"user-42\"}'.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("command", help="The command a request would name.")
        parser.add_argument("request", nargs="?", metavar="JSON",
                            help="Routing fields of the request (select, affinity).")
        add_routing(parser)
        parser.add_argument("--json", action="store_true",
                            help="Print the explanation as JSON instead of a table.")
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        given = parse_json(options["request"], "JSON")
        unknown = sorted(set(given) - {"select", "affinity", "data", "request_id",
                                       "command", "timeout", "stream", "priority", "hedge"})
        if unknown:
            raise CommandError(f"JSON: unknown field(s) {', '.join(unknown)}")
        body = {k: given[k] for k in ("select", "affinity") if k in given} | routing(options)
        found = client.explain(options["command"], **body)
        if options["json"]:
            self.write_json(found)
            return
        self.stdout.write(format_explanation(found))


def format_explanation(found: dict[str, Any]) -> str:
    """The routing line, then one row per candidate, the chosen one marked."""
    if found["worker_id"]:
        head = f"Next request goes to {found['worker_id']}"
    elif found["capable"]:
        head = "Next request would wait: every matching worker is busy or out of rotation"
    elif found.get("unmatched"):
        head = f"Next request fails: no worker offering it has {found['unmatched']}"
    else:
        head = f"Next request fails: no worker offers '{found['command']}'"
    lines = [head, f"  routing: {found['routing']}"]
    rows = [COLUMNS] + [(
        "*" if c["chosen"] else "", c["worker_id"], c["name"], c["state"],
        f"{c['in_flight']}/{c['max_concurrency']}", f"{c['weight']:g}",
        duration(c["latency_ms"]), percent(c["error_rate"]), f"{c['score']:.3g}",
        ",".join(f"{k}={v}" for k, v in sorted(c["labels"].items())) + (
            f" v{c['version']}" if c["version"] else ""),
    ) for c in found["candidates"]]
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                  for r in rows]
    return "\n".join(lines)
