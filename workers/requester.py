"""Requester client: send commands to the broker and get the workers' answers.

The requester socket speaks the seed's plain JSON API (see
:class:`workers.protocol.ApiRequest` and :class:`~workers.protocol.ApiResponse`).
One connection carries many requests at once; answers come back in whatever
order the workers finish and are matched by ``request_id``. So this client has a
single reader task that resolves one future per request, and any number of
callers can wait on the same connection.

Three ways in:

* :class:`Requester` – the asyncio API::

      async with Requester("ws://127.0.0.1:8766") as r:
          print(await r.call("calculate", a=10, b=20, op="+"))

* :class:`SyncRequester` – the same, blocking, for scripts and threads;
* ``python -m workers.requester HOST PORT [COMMAND [JSON]]`` – one request from
  the shell, or an interactive console like the seed's.

Nothing here imports Django: a requester machine needs only ``websockets``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TextIO, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .address import auth_headers, broker_url, default_token, is_url
from .console import parse_data
from .console import serve as console_lines
from .errors import (AllBusy, BrokerUnavailable, CommandFailed, ConnectionLost, NoWorkers,
                     Refused, RequestFailed, Timeout, WorkerLost, describe)
from .protocol import ApiRequest, ApiResponse, ProtocolError

__all__ = ["AllBusy", "BrokerUnavailable", "CommandFailed", "ConnectionLost", "NoWorkers",
           "Refused", "RequestFailed", "Requester", "SyncRequester", "Timeout", "WorkerLost"]

logger = logging.getLogger("workers.requester")

T = TypeVar("T")

DEFAULT_PORT = 8766
#: The broker's default request timeout; a request without its own ``timeout`` gets this.
DEFAULT_TIMEOUT = 30.0
#: Extra time given to the broker beyond the request's timeout before we stop waiting:
#: the broker answers ``Worker response timeout`` itself, and that answer should win.
DEFAULT_MARGIN = 5.0
#: Frames we accept; the broker enforces its own (smaller) limit on what it sends.
MAX_FRAME_BYTES = 16 * 2**20


# --------------------------------------------------------------------------- async client


class Requester:
    """An asyncio client of the requester API; one connection, many requests in flight.

    ``default_timeout`` is what the client assumes the broker allows a request
    that names no timeout of its own (the broker's default is 30 s); the client
    waits that long plus ``margin`` before giving up with :class:`TimeoutError`,
    so nothing waits forever even if the broker never answers.
    """

    def __init__(self, url: str, *, token: str | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT,
                 margin: float = DEFAULT_MARGIN, open_timeout: float = 10.0) -> None:
        self.url = url
        self.token = token
        self.default_timeout = default_timeout
        self.margin = margin
        self.open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[ApiResponse]] = {}
        self._lost: str | None = None

    async def connect(self) -> Requester:
        """Open the connection; raises ``OSError``/``InvalidHandshake``/``TimeoutError``."""
        self._ws = await connect(self.url, max_size=MAX_FRAME_BYTES,
                                 open_timeout=self.open_timeout,
                                 additional_headers=auth_headers(self.token))
        self._lost = None
        self._reader = asyncio.create_task(self._read_loop(self._ws),
                                           name="workers.requester reader")
        logger.debug("Connected to %s", self.url)
        return self

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with :class:`ConnectionLost`."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader
            self._reader = None

    async def __aenter__(self) -> Requester:
        return await self.connect()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def request(self, command: str, data: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> ApiResponse:
        """Send one command and return the broker's answer, successful or not.

        ``timeout`` (seconds) is passed to the broker, which answers
        ``Worker response timeout`` when it runs out. Raises
        :class:`ConnectionLost` if the connection is or goes down before the
        answer, and :class:`TimeoutError` if no answer came within
        ``timeout`` (or ``default_timeout``) plus ``margin``.
        """
        ws = self._require_connection()
        req = ApiRequest(command, dict(data or {}), timeout=timeout)
        future: asyncio.Future[ApiResponse] = asyncio.get_running_loop().create_future()
        self._pending[req.request_id] = future
        try:
            try:
                await ws.send(req.to_json())
            except ConnectionClosed as exc:
                raise ConnectionLost(f"Connection to {self.url} lost: {describe(exc)}") from None
            return await self._wait(future, command, timeout)
        finally:
            self._pending.pop(req.request_id, None)

    async def call(self, command: str, /, *, timeout: float | None = None, **data: Any) -> Any:
        """Send one command with ``data`` as keyword arguments; return the answer's data.

        Raises a :class:`RequestFailed` when the answer is a failure: the subclass
        for its code (:class:`NoWorkers`, :class:`Timeout`, :class:`WorkerLost`,
        :class:`CommandFailed`...). Use :meth:`request` to pass a parameter that is
        itself called ``timeout``.
        """
        response = await self.request(command, data, timeout=timeout)
        if not response.success:
            raise RequestFailed.from_answer(response.error, response.code, response)
        return response.data

    # -- internals

    def _require_connection(self) -> ClientConnection:
        if self._ws is None:
            raise ConnectionLost(f"Not connected to {self.url}; use 'async with' or connect()")
        if self._lost is not None:
            raise ConnectionLost(f"Connection to {self.url} lost: {self._lost}")
        return self._ws

    async def _wait(self, future: asyncio.Future[ApiResponse], command: str,
                    timeout: float | None) -> ApiResponse:
        """Wait for the answer, but never longer than the broker's own limit plus a margin."""
        limit = (self.default_timeout if timeout is None else timeout) + self.margin
        try:
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"No answer to '{command}' from {self.url} within {limit:.1f}s") from None

    async def _read_loop(self, ws: ClientConnection) -> None:
        """Resolve waiting calls as answers arrive; fail them all when the connection ends."""
        reason = "connection closed"
        try:
            async for raw in ws:
                self._on_frame(raw)
            reason = _close_reason(ws)
        except ConnectionClosed as exc:
            reason = describe(exc)
        finally:
            self._lost = reason
            logger.debug("Connection to %s ended: %s", self.url, reason)
            self._fail_all(ConnectionLost(f"Connection to {self.url} lost: {reason}"))

    def _on_frame(self, raw: str | bytes) -> None:
        try:
            response = ApiResponse.from_json(raw)
        except ProtocolError as exc:
            logger.warning("Unreadable frame from %s: %s", self.url, exc)
            return
        future = self._match(response)
        if future is None:
            logger.debug("Answer to unknown request %s dropped", response.request_id)
        elif not future.done():
            future.set_result(response)

    def _match(self, response: ApiResponse) -> asyncio.Future[ApiResponse] | None:
        """The call an answer belongs to.

        The broker answers with ``request_id`` null only when it could not read
        the frame at all (for instance, one over its size limit). With exactly one
        call waiting, that call is the only frame it can be about; with several,
        nothing can be matched and the calls run into their wait limits.
        """
        if response.request_id is not None:
            return self._pending.get(response.request_id)
        logger.warning("Broker refused a frame: %s", response.error)
        if len(self._pending) == 1:
            return next(iter(self._pending.values()))
        return None

    def _fail_all(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)


def _close_reason(ws: ClientConnection) -> str:
    code, text = ws.close_code, ws.close_reason
    if code is None:
        return "connection closed"
    return f"closed by broker (code {code}{': ' + text if text else ''})"


# --------------------------------------------------------------------------- sync wrapper


class SyncRequester:
    """:class:`Requester` for code without an event loop.

    A private event loop runs in a daemon thread; every method hands a coroutine
    to it and blocks until it is done. Calls from several threads may overlap:
    they share the one connection, as concurrent async calls do.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="workers.requester loop", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._requester = self._run(self._open(url, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _open(url: str, options: dict[str, Any]) -> Requester:
        return await Requester(url, **options).connect()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def request(self, command: str, data: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> ApiResponse:
        """Blocking :meth:`Requester.request`."""
        return self._run(self._requester.request(command, data, timeout=timeout))

    def call(self, command: str, /, *, timeout: float | None = None, **data: Any) -> Any:
        """Blocking :meth:`Requester.call`."""
        return self._run(self._requester.call(command, timeout=timeout, **data))

    def close(self) -> None:
        """Close the connection and stop the background loop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._requester.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncRequester:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --------------------------------------------------------------------------- CLI

EXIT_OK, EXIT_FAILED, EXIT_UNREACHABLE = 0, 1, 2

CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake, InvalidURI)


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
        return await Requester(url, token=token).connect()
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
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    url, command, data = parse_target(parser, args)
    if command is not None:
        return asyncio.run(one_shot(url, command, data, args.timeout, sys.stdout, args.token))
    return asyncio.run(interactive(url, args.token, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
