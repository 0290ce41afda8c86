"""``python -m workers HOST PORT [options]``: run a worker (the seed's ``client.py``).

The worker dials out to the broker, registers its commands (the built-ins plus
those of every ``--handlers`` module), runs what it is sent, and reconnects
whenever the broker goes away. SIGINT or SIGTERM stop it gracefully: it tells
the broker, finishes the requests in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from .address import broker_url, default_token, is_url
from .client import Worker
from .console import PromptedLog, serve as console_lines
from .errors import ConnectionLost, RequestFailed
from .protocol import label

logger = logging.getLogger("workers.client")

DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Run a worker: connect to the broker's worker socket, register the "
                    "commands this machine offers, and run the requests it is sent. "
                    "Reconnects with backoff when the broker goes away; stops gracefully "
                    "on Ctrl-C or SIGTERM.",
    )
    parser.add_argument("host", nargs="?", default=None,
                        help="broker host (default localhost), or a full ws:// or wss:// URL")
    parser.add_argument("port", nargs="?", type=int, default=None,
                        help=f"broker worker port (default {DEFAULT_PORT})")
    parser.add_argument("--url", action="append", default=[], metavar="URL",
                        help="another broker URL; repeat for several. Each reconnect tries "
                             "the next one")
    parser.add_argument("--name", help="name shown in the broker's lists (default "
                                       "<hostname>-<pid>)")
    parser.add_argument("--weight", type=float, default=1.0,
                        help="relative share of work this worker should get (default 1.0)")
    parser.add_argument("--max-concurrency", type=int, default=16,
                        help="requests this worker runs at once at most (default 16)")
    parser.add_argument("--label", action="append", default=[], type=label,
                        metavar="NAME=VALUE",
                        help="a label requests may select this worker by (\"select\": "
                             "{\"gpu\": \"a100\"}); repeatable, e.g. --label gpu=a100 "
                             "--label region=eu")
    parser.add_argument("--version", dest="worker_version", default="",
                        help="this worker's version, for canary routing (BROKER_CANARY)")
    parser.add_argument("--handlers", action="append", default=[], metavar="MODULE",
                        help="module (dotted name, or path to a .py file) whose @command() "
                             "functions this worker also serves; repeatable")
    parser.add_argument("--commands", metavar="NAME,...",
                        help="serve only these commands (comma-separated), e.g. when the "
                             "worker token allows only some; default: all it has")
    parser.add_argument("--token", default=default_token(),
                        help="worker token, when the broker has credentials "
                             "(default $BROKER_TOKEN)")
    parser.add_argument("--console", action="store_true",
                        help="also read console commands from standard input, as the "
                             "seed's client.start(enable_console=True): 'request get_time', "
                             "'request calculate {\"a\": 10, \"b\": 20, \"op\": \"+\"}' "
                             "(the broker's own actions), 'help', 'quit'")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level on standard error (default INFO)")
    return parser


def broker_urls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The URLs to dial, in order: the positional target first, then each --url."""
    urls: list[str] = []
    if args.host is not None and is_url(args.host):
        if args.port is not None:
            parser.error("give either a URL or HOST PORT, not both")
        urls.append(args.host)
    elif args.host is not None or not args.url:
        urls.append(broker_url(args.host or "localhost", args.port or DEFAULT_PORT))
    return urls + args.url


def load_handlers(name: str) -> ModuleType:
    """Import a user's module so that its ``@command()`` functions register."""
    if name.endswith(".py"):
        path = Path(name)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None or not path.is_file():
            raise ImportError(f"No such file: {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        # `python -m workers` looks in the current folder first; the installed
        # `broker-worker` script would not, and `--handlers my_commands` must work alike.
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


async def console(worker: Worker, stdin: TextIO, out: TextIO) -> None:
    """The seed's worker console: requests go to the broker's server actions.

    End of input or ``quit`` stops the worker gracefully.
    """

    async def ask(command: str, data: dict[str, Any]) -> str:
        try:
            answer = {"success": True, "data": await worker.request(command, data)}
        except RequestFailed as exc:
            answer = {"success": False, "error": exc.error, "code": exc.code}
        except (TimeoutError, ConnectionLost) as exc:
            return f"Not answered: {exc}"
        return json.dumps(answer, ensure_ascii=False)

    await console_lines(ask, stdin, out, "Worker console. Type 'help' for commands.")
    await worker.stop()


async def serve(worker: Worker, with_console: bool = False) -> None:
    """Run the worker; the first signal stops it gracefully, a second one at once."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    stopping: list[asyncio.Task[None]] = []  # keeps the stop task referenced until done

    def on_signal(signum: int) -> None:
        if not stopping:
            logger.info("%s received; stopping gracefully", signal.Signals(signum).name)
            stopping.append(loop.create_task(worker.stop()))
        elif main_task is not None:
            logger.warning("Second signal; stopping now")
            main_task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    reader = loop.create_task(console(worker, sys.stdin, sys.stdout)) if with_console else None
    try:
        await worker.run()
    finally:
        if reader is not None:
            reader.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompted = args.console and sys.stdin.isatty()  # log lines must not land after "> "
    logging.basicConfig(level=args.log_level,
                        handlers=[PromptedLog(sys.stderr, sys.stdout) if prompted
                                  else logging.StreamHandler(sys.stderr)],
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    urls = broker_urls(parser, args)
    for name in args.handlers:
        try:
            load_handlers(name)
        except Exception as exc:
            parser.error(f"cannot load handlers {name!r}: {type(exc).__name__}: {exc}")
    try:
        worker = Worker(urls, name=args.name, weight=args.weight,
                        max_concurrency=args.max_concurrency, token=args.token,
                        labels=dict(args.label), version=args.worker_version)
    except ValueError as exc:
        parser.error(str(exc))
    if args.commands:
        wanted = {c.strip() for c in args.commands.split(",") if c.strip()}
        unknown = sorted(wanted - set(worker.registry.names()))
        if unknown:
            parser.error(f"--commands names commands this worker does not have: "
                         f"{', '.join(unknown)}")
        worker.registry = worker.registry.only(wanted)
    logger.info("Worker %s serving %s", worker.name, ", ".join(worker.registry.names()))
    try:
        asyncio.run(serve(worker, args.console))
    except asyncio.CancelledError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
