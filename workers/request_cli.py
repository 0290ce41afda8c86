"""``python -m workers.requester HOST PORT [COMMAND [JSON]]`` (also ``broker-request``):
one request from the shell, or an interactive console like the seed's.

Apart from :mod:`workers.requester` so that the client library carries no argument
parsing or terminal I/O; this module only turns a command line into client calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any, TextIO

from .address import broker_url, default_token, is_url
from .console import parse_data
from .console import serve as console_lines
from .errors import ConnectionLost, describe
from .protocol import ApiResponse
from .requester import CONNECT_ERRORS, DEFAULT_PORT, Requester

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers.requester",
        usage="%(prog)s [options] [HOST PORT | URL] [COMMAND [JSON]]",
        description="Send commands to the broker's requester API. With COMMAND, send one "
                    "request, print the answer as JSON and exit 0 on success, 1 on a failure "
                    "answer, 2 when the broker cannot be reached or does not answer. Without "
                    "COMMAND, start an interactive console reading standard input.",
    )
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="broker host and requester port (default localhost 8766), or one "
                             "ws:// URL in their place; then the command to send and its data "
                             "as a JSON object, e.g. calculate '{\"a\": 1, \"b\": 2}'")
    parser.add_argument("--url", help="broker URL such as ws://host:8766/ (then HOST PORT "
                                      "are left out)")
    parser.add_argument("--token", default=default_token(),
                        help="API key, when the broker has credentials (default $BROKER_TOKEN)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds the broker may take for each request (default: the "
                             "broker's own, normally 30)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level of messages on standard error (default WARNING)")
    return parser


def parse_target(parser: argparse.ArgumentParser, args: argparse.Namespace
                 ) -> tuple[str, str | None, dict[str, Any]]:
    """Split the positional arguments into (url, command, data)."""
    rest = list(args.args)
    if args.url:
        url = args.url
    elif rest and is_url(rest[0]):
        url = rest.pop(0)
    elif not rest:
        url = broker_url("localhost", DEFAULT_PORT)
    elif len(rest) >= 2 and rest[1].isdigit():
        url = broker_url(rest[0], int(rest[1]))
        rest = rest[2:]
    else:
        parser.error("expected HOST PORT (or a ws:// URL, or --url) before the command")
    if len(rest) > 2:
        parser.error("too many arguments: quote the JSON data as one argument")
    command = rest[0] if rest else None
    data: dict[str, Any] = {}
    if len(rest) == 2:
        try:
            data = parse_data(rest[1])
        except ValueError as exc:
            parser.error(str(exc))
    return url, command, data


def format_response(response: ApiResponse) -> str:
    return json.dumps(response.to_dict(), indent=2, ensure_ascii=False)


async def open_or_say_why(url: str, token: str | None) -> Requester | None:
    """A connected requester, or None after saying on stderr why there is none."""
    try:
        # A person at a console (or a script) wants to hear at once that the broker is
        # gone, not a wait for it to come back.
        return await Requester(url, token=token, reconnect=False).connect()
    except CONNECT_ERRORS as exc:
        print(f"Cannot reach the broker at {url}: {describe(exc)}", file=sys.stderr)
        return None


async def one_shot(url: str, command: str, data: dict[str, Any], timeout: float | None,
                   out: TextIO, token: str | None = None) -> int:
    """Send a single request and print its answer."""
    requester = await open_or_say_why(url, token)
    if requester is None:
        return EXIT_UNREACHABLE
    try:
        response = await requester.request(command, data, timeout=timeout)
    except (ConnectionLost, TimeoutError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await requester.close()
    print(format_response(response), file=out)
    return EXIT_OK if response.success else EXIT_FAILED


async def console(requester: Requester, timeout: float | None, stdin: TextIO,
                  out: TextIO) -> int:
    """The seed's interactive console, one line at a time (works on a pipe too)."""

    async def ask(command: str, data: dict[str, Any]) -> str:
        try:
            return format_response(await requester.request(command, data, timeout=timeout))
        except TimeoutError as exc:
            return str(exc)

    try:
        await console_lines(ask, stdin, out, "Connected. Type 'help' for commands.")
    except ConnectionLost as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


async def interactive(url: str, token: str | None, timeout: float | None) -> int:
    requester = await open_or_say_why(url, token)
    if requester is None:
        return EXIT_UNREACHABLE
    try:
        return await console(requester, timeout, sys.stdin, sys.stdout)
    finally:
        await requester.close()


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.log_level)
    url, command, data = parse_target(parser, args)
    if command is not None:
        return asyncio.run(one_shot(url, command, data, args.timeout, sys.stdout, args.token))
    return asyncio.run(interactive(url, args.token, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
