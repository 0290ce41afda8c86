"""The seed's interactive console, shared by the requester CLI and ``python -m workers
--console``: one line at a time, ``request COMMAND [JSON]``, ``help``, ``quit``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

HELP = """\
Commands:
  request COMMAND [JSON]   send COMMAND with JSON object data, e.g.
                           request calculate {"a": 10, "b": 20, "op": "+"}
  help                     show this text
  quit                     leave (also: exit, end of input)"""


@dataclass(frozen=True, slots=True)
class Line:
    """One console line, understood: ``verb`` is request, help, quit, blank or unknown."""

    verb: str
    command: str = ""
    data: dict[str, Any] | None = None
    problem: str = ""  # why a request line cannot be sent


def parse_data(text: str) -> dict[str, Any]:
    """JSON text that must be an object; ``ValueError`` with a readable reason otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON data: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"JSON data must be an object, got {type(value).__name__}")
    return value


def parse(text: str) -> Line:
    verb, _, rest = text.strip().partition(" ")
    if not verb:
        return Line("blank")
    if verb in ("quit", "exit"):
        return Line("quit")
    if verb == "help":
        return Line("help")
    if verb != "request":
        return Line("unknown", problem=f"Unknown console command '{verb}'; type 'help'.")
    command, _, payload = rest.strip().partition(" ")
    if not command:
        return Line("request", problem="Usage: request COMMAND [JSON]")
    try:
        return Line("request", command, parse_data(payload) if payload.strip() else {})
    except ValueError as exc:
        return Line("request", command, problem=f"Not sent: {exc}")
