"""``manage.py describe [COMMAND]``: every command the fleet offers, and what it takes."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandParser

from workers.protocol import quote

from ...control.client import BrokerClient
from ..base import BrokerCommand

COLUMNS = ("COMMAND", "WORKERS", "PARAMS", "DOC")
#: Worker names a table row shows before it only counts the rest.
NAMES_SHOWN = 3
#: Characters of a worker's text (a name, a default) printed at most.
TEXT_LIMIT = 200
DIFFER = "its workers sent different schemas: shown is the one most of them sent"


class Command(BrokerCommand):
    help = ("Describes the commands the online workers offer: by which workers, their "
            "parameters (name: type = default) and the first line of each handler's "
            "docstring, as each worker announced them when it registered. With COMMAND, "
            "that command in detail.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("command", nargs="?",
                            help="Only this command, in detail (an error if no online "
                                 "worker offers it).")
        parser.add_argument("--json", action="store_true",
                            help="Print JSON instead: GET /api/commands's answer, or with "
                                 "COMMAND that command's part of it.")
        super().add_arguments(parser)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        found = client.commands(options["command"])["commands"]
        if options["json"]:
            self.write_json(found[0] if options["command"] else {"commands": found})
        elif options["command"]:
            self.stdout.write(format_command(found[0]))
        else:
            self.stdout.write(format_commands(found))


def format_commands(commands: list[dict[str, Any]]) -> str:
    """One row per command, columns aligned (the doc line last, unpadded); a
    sentence if there are none."""
    if not commands:
        return "No commands offered: no workers online."
    rows = [COLUMNS] + [(
        _text(c["command"]) + ("*" if c["schemas_differ"] else ""),
        _workers(c),
        _params(c["schema"]),
        _text((c["schema"] or {}).get("doc", "")),
    ) for c in commands]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
             for row in rows]
    if any(c["schemas_differ"] for c in commands):
        lines.append(f"* {DIFFER} (describe COMMAND --json lists each worker)")
    return "\n".join(lines)


def format_command(c: dict[str, Any]) -> str:
    """One command in detail: its doc line, its workers, a line per parameter, stats."""
    schema = c["schema"]
    doc = (schema or {}).get("doc")
    lines = [_text(c["command"]) + (f": {_text(doc)}" if doc else ""),
             f"  workers ({c['count']}): " + ", ".join(
                 _text(w["worker_id"]) if w["name"] == w["worker_id"]
                 else f"{_text(w['name'])} ({_text(w['worker_id'])})" for w in c["workers"])]
    if schema is None:
        lines.append("  parameters: unknown (its workers sent no schema)")
    else:
        params = schema["params"]
        lines.append("  parameters:" + ("" if params or schema.get("extra") else " none"))
        lines += [f"    {_param(p)}" + ("  (required)" if p["required"] else "")
                  for p in params]
        if schema.get("extra"):
            lines.append("    **kwargs: it takes any others too")
        if schema.get("returns"):
            lines.append(f"  returns: {_text(schema['returns'])}")
        if schema.get("stream"):
            lines.append("  streams: yes (partial results as chunks)")
    lines += [f"  {_text(key)}: {_text(json.dumps(value))}" for key, value in c["stats"].items()]
    if c["schemas_differ"]:
        lines.append(f"  note: {DIFFER}")
    return "\n".join(lines)


def _workers(c: dict[str, Any]) -> str:
    """``3 (alpha, beta, gamma)``, or ``12 (alpha, beta, gamma, +9)``."""
    names = [_text(w["name"], 40) for w in c["workers"][:NAMES_SHOWN]]
    more = c["count"] - len(names)
    return f"{c['count']} ({', '.join(names)}{f', +{more}' if more > 0 else ''})"


def _params(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "?"
    parts = [_param(p) for p in schema["params"]]
    if schema.get("extra"):
        parts.append("**kwargs")
    return ", ".join(parts) or "-"


def _param(p: dict[str, Any]) -> str:
    """``name: type = default``, as much of it as is known (a default as JSON)."""
    text = _text(p["name"])
    if "type" in p:
        text += f": {_text(p['type'])}"
    if "default" in p:
        text += f" = {_text(json.dumps(p['default'], ensure_ascii=False))}"
    elif "default_repr" in p:
        text += f" = {_text(p['default_repr'])}"
    return text


def _text(value: str, limit: int = TEXT_LIMIT) -> str:
    """A worker's text made safe for a terminal: control characters escaped, cut."""
    return quote(value, limit)
