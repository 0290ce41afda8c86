"""``manage.py console``: the seed server's interactive console, through the broker.

It reads standard input line by line rather than through ``input()`` so that a
script can be piped in; a bad line prints why and the console reads the next one.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

from django.core.management.base import CommandError

from ...control.client import BrokerClient, BrokerUnreachable, ControlError
from ..base import BrokerCommand, dumps, format_workers, parse_json, parse_message

HELP = """\
Commands:
  help                                  show this help
  list                                  list online workers and their load
  send <client_id> <action> [params]    send a request to one worker
                                        e.g. send abc123 calculate {"a": 10, "b": 20, "op": "+"}
  call <command> [data]                 run a command on the best worker
                                        e.g. call echo {"message": "Hello World"}
  broadcast <message>                   notify every worker (JSON or plain text)
  quit                                  leave the console (also: exit, end of input)"""

QUIT = frozenset({"quit", "exit", "q"})


class ConsoleInputError(Exception):
    """A line the console cannot act on; printed, then the console goes on."""


class Command(BrokerCommand):
    help = (
        "Interactive console for the running broker: list workers, send requests, "
        "broadcast. Reads commands from standard input, so it also runs from a pipe."
    )
    # call_command(..., stdin=StringIO(...)) for tests and scripts.
    stealth_options = ("stdin",)

    def handle_broker(self, client: BrokerClient, **options: Any) -> None:
        self.client = client
        stdin: TextIO = options.get("stdin") or sys.stdin
        self._greet()
        interactive = stdin.isatty()
        while True:
            if interactive:
                self.stdout.write("> ", ending="")
                self.stdout.flush()
            line = stdin.readline()
            if not line or not self.run_line(line):
                break

    def _greet(self) -> None:
        """Fail fast with the usual message when there is no broker to talk to."""
        try:
            health = self.client.health()
        except BrokerUnreachable as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Connected to {self.client.base_url} ({health.get('process', '?')}, "
            f"{health.get('workers', '?')} workers online). Type 'help' for commands."
        )

    def run_line(self, line: str) -> bool:
        """Act on one line; False means the user asked to quit."""
        verb, _, rest = line.strip().partition(" ")
        if not verb:
            return True
        if verb.lower() in QUIT:
            return False
        action = self.actions().get(verb.lower())
        try:
            if action is None:
                raise ConsoleInputError(f"Unknown command '{verb}'. Type 'help' for commands.")
            action(rest.strip())
        except (ConsoleInputError, CommandError, ControlError) as exc:
            self.stderr.write(f"Error: {exc}")
        return True

    def actions(self) -> dict[str, Callable[[str], None]]:
        return {"help": self.do_help, "list": self.do_list, "send": self.do_send,
                "call": self.do_call, "broadcast": self.do_broadcast}

    # ----------------------------------------------------------------- one per verb

    def do_help(self, rest: str) -> None:
        self.stdout.write(HELP)

    def do_list(self, rest: str) -> None:
        self.stdout.write(format_workers(self.client.workers()))

    def do_send(self, rest: str) -> None:
        worker_id, action, params = _split(rest, 2, "send <client_id> <action> [params]")
        response = self.client.send(worker_id, action, parse_json(params, "params"))
        self.stdout.write(dumps(response))

    def do_call(self, rest: str) -> None:
        command, data = _split(rest, 1, "call <command> [data]")
        response = self.client.call(command, parse_json(data, "data"))
        self.stdout.write(dumps(response))

    def do_broadcast(self, rest: str) -> None:
        if not rest:
            raise ConsoleInputError("Usage: broadcast <message>")
        count = self.client.broadcast(parse_message(rest))
        self.stdout.write(f"Sent to {count} worker{'' if count == 1 else 's'}.")


def _split(rest: str, words: int, usage: str) -> list[str]:
    """The first ``words`` words, then the rest of the line (JSON keeps its spaces).

    Returns ``words + 1`` items, the last possibly empty.
    """
    parts = rest.split(None, words)
    if len(parts) < words:
        raise ConsoleInputError(f"Usage: {usage}")
    head = parts[:words]
    for word in head:
        if word.startswith(("{", "[", '"')):
            raise ConsoleInputError(f"Usage: {usage}")
    return [*head, parts[words] if len(parts) > words else ""]
