"""The seed's interactive console, shared by the requester CLI and ``python -m workers
--console``: one line at a time, ``request COMMAND [JSON]``, ``help``, ``quit``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

HELP = """\
Commands:
  request COMMAND [JSON]   send COMMAND with JSON object data, e.g.
                           request calculate {"a": 10, "b": 20, "op": "+"}
  help                     show this text
  quit                     leave (also: exit, end of input)"""
PROMPT = "> "


class PromptedLog(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on a console's terminal. While the prompt waits for a line, a log line
    takes the prompt's place and the prompt is drawn again below it; else the line
    lands after ``> `` and the user types on after it."""

    def __init__(self, stream: TextIO, prompt_out: TextIO) -> None:
        super().__init__(stream)
        self.prompt_out = prompt_out
        self.prompting = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.prompting:
            super().emit(record)
            return
        self.stream.write("\r\x1b[K")  # back to the line's start, and clear it
        super().emit(record)
        self.prompt_out.write(PROMPT)
        self.prompt_out.flush()


def _prompting(showing: bool) -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PromptedLog):
            handler.prompting = showing


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


#: ``ask(command, data)``: the text to print for one request's answer.
Ask = Callable[[str, dict[str, Any]], Awaitable[str]]


async def serve(ask: Ask, stdin: TextIO, out: TextIO, greeting: str) -> None:
    """Read lines until ``quit`` or the end of input; answer each.

    Standard input is read in a thread, so whatever else runs on the loop (a
    worker serving) goes on meanwhile. ``ask`` may raise to end the console (the
    connection is gone).
    """
    interactive = stdin.isatty()
    if interactive:
        print(greeting, file=out, flush=True)
    while True:
        if interactive:
            print(PROMPT, end="", file=out, flush=True)
            _prompting(True)
        try:
            raw = await asyncio.to_thread(stdin.readline)
        finally:
            _prompting(False)
        line = parse(raw) if raw else Line("quit")
        if line.verb == "quit":
            return
        if line.verb == "help":
            print(HELP, file=out)
        elif line.problem:
            print(line.problem, file=out)
        elif line.verb == "request":
            print(await ask(line.command, line.data or {}), file=out)
        out.flush()
