"""Running the broker: daphne on three ports, signals, and several processes.

``manage.py runbroker`` parses its flags and calls :func:`serve` (one process) or
:func:`supervise` (``--processes N``). What is here is the part of running that
no ASGI server does for us: the graceful drain on SIGTERM, closing daphne's loop
so that nothing outlives it, and a small supervisor for trying a cluster out on
one machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from django.conf import settings

from . import conf

log = logging.getLogger("dispatch.server")


def supervise(commands: list[list[str]], say: Callable[[str], Any],
              ports_file: str | None = None) -> int:
    """Run one broker process per command until SIGINT/SIGTERM, passing signals on.

    Each child is given a ``--ports-file`` of its own: the parent waits until every
    child listens (and then writes ``ports_file``, if asked, with theirs). A child
    that exits before it listens (its ports are taken, its settings are wrong) stops
    the others, and the parent exits 1 at once. A process manager (systemd,
    supervisord) does this better in production: this is for one machine and for
    trying a cluster out. A child that dies later is started again (its requests were
    taken over meanwhile); one that keeps dying stops them all, and the parent exits 1.
    """
    scratch = Path(tempfile.mkdtemp(prefix="runbroker-"))
    told = [scratch / f"process-{i}.json" for i in range(len(commands))]
    children = [subprocess.Popen([*cmd, "--ports-file", str(path)], cwd=settings.BASE_DIR)
                for cmd, path in zip(commands, told)]
    say(f"Started {len(children)} broker processes: pids "
        f"{', '.join(str(c.pid) for c in children)}")
    signalled: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        signalled.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        while not signalled and not all(path.exists() for path in told):
            failed = next((c for c in children if c.poll() is not None), None)
            if failed is not None:
                log.error("broker process %d exited with %d before it listened: stopping "
                          "the others", failed.pid, failed.returncode)
                return _stop_all(children)
            time.sleep(0.05)
        if not signalled and ports_file:
            write_json(ports_file, {"pid": os.getpid(), "processes": [
                json.loads(path.read_text()) for path in told]})
        return _keep_running(commands, children, told, signalled)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: A child that dies this soon after it started, this many times running, is not
#: started again: something is wrong with it, not with its luck.
SHORT_LIFE, SHORT_LIVES = 10.0, 3


def _keep_running(commands: list[list[str]], children: list[subprocess.Popen[bytes]],
                  told: list[Path], signalled: list[int]) -> int:
    """Until a signal: start again a child that died; then wait for them all."""
    started = [time.monotonic()] * len(children)
    short = [0] * len(children)
    while not signalled:
        for i, child in enumerate(children):
            if child.poll() is None or signalled:
                continue
            log.error("broker process %d exited with %d: starting it again", child.pid,
                      child.returncode)
            short[i] = short[i] + 1 if time.monotonic() - started[i] < SHORT_LIFE else 1
            if short[i] >= SHORT_LIVES:
                log.error("broker process %d died %d times within %.0f s of starting: "
                          "stopping them all", i, short[i], SHORT_LIFE)
                return _stop_all(children)
            told[i].unlink(missing_ok=True)
            children[i] = subprocess.Popen([*commands[i], "--ports-file", str(told[i])],
                                           cwd=settings.BASE_DIR)
            started[i] = time.monotonic()
        time.sleep(0.2)
    codes = [child.wait() for child in children]
    for child, code in zip(children, codes):
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            log.error("broker process %d exited with %d", child.pid, code)
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1


def _stop_all(children: list[subprocess.Popen[bytes]]) -> int:
    """Stop every child still running and wait for them all; the parent's exit code."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        child.wait()
    return 1


class CannotListen(Exception):
    """A port could not be listened on (taken, not allowed, no such interface)."""


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``path`` whole or not at all: a reader polling for it never sees half."""
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(partial, path)


def serve(host: str, ports: list[int], say: Callable[[str], Any],
          ports_file: str | None = None) -> None:
    """Run daphne until SIGINT/SIGTERM; ``say`` prints the ready line.

    A port of 0 takes one the system chooses; the ready line and ``ports_file``
    (JSON: ``worker``, ``requester``, ``http``, ``pid``, ``process``, written once
    every port listens) tell which. Raises :class:`CannotListen` when a port cannot
    be listened on, before serving anything.
    """
    # daphne installs Twisted's asyncio reactor when imported: import it first.
    from daphne.endpoints import build_endpoint_description_strings

    from .fleetserver import FleetServer

    from brokersite.asgi import application

    from .control.actions import load_action_modules

    load_action_modules()
    files = raise_open_files()
    quiet_autobahn_debug()
    # Twisted listens with a backlog of 50: a fleet dialling back after a restart
    # overflows it, and every dropped SYN costs its worker a second or more.
    endpoints = [f"{e}:backlog={LISTEN_BACKLOG}" for port in ports
                 for e in build_endpoint_description_strings(host=host, port=port)]
    limit = conf.get("MAX_MESSAGE_BYTES")

    def ready() -> None:
        if len(server.bound) != len(ports) or not all(isinstance(p, int) for p in server.bound):
            from twisted.internet import reactor

            reactor.callWhenRunning(reactor.stop)  # reported once run() returns
            return
        worker_port, requester_port, http_port = server.bound  # type: ignore[misc]
        if list(server.bound) != list(ports):  # some were 0: routing goes by port
            server.worker_port = worker_port
            conf.override(WORKER_PORT=worker_port, REQUESTER_PORT=requester_port,
                          HTTP_PORT=http_port)
        graceful_stop_on_signals(conf.get("SHUTDOWN_GRACE"))
        start_schedules()
        say(f"Broker ready: workers ws://{host}:{worker_port}  "
            f"requesters ws://{host}:{requester_port}  http://{host}:{http_port}  "
            f"(strategy {conf.get('STRATEGY')}, timeout {conf.get('TIMEOUT')}s, "
            f"process {conf.process_name()})")
        if ports_file:
            write_json(ports_file, {"worker": worker_port, "requester": requester_port,
                                    "http": http_port, "pid": os.getpid(),
                                    "process": conf.process_name()})

    server = FleetServer(
        application=application,
        endpoints=endpoints,
        worker_port=ports[0],
        room=max(1, min(files, 1 << 30) - RESERVED_FILES),
        # Frames a little over our own limit still arrive, so the sender gets a clear
        # error; far larger ones are cut off by daphne with close code 1009.
        websocket_max_message_size=4 * limit + 65536,
        websocket_max_frame_size=4 * limit + 65536,
        # Workers stay connected for days: daphne's default closes every socket
        # after 24 hours.
        websocket_timeout=-1,
        ready_callable=ready,
        verbosity=0,
        signal_handlers=False,  # ours, below: finish requests in flight first
    )
    server.run()
    finish_loop()
    refused = [p for p in server.bound if isinstance(p, str)]
    if refused or len(server.bound) != len(ports):
        raise CannotListen(refused[0] if refused else "not every port listens")
    log.info("broker stopped")


#: Connections the kernel may hold for each port before daphne accepts them (capped
#: by net.core.somaxconn).
LISTEN_BACKLOG = 4096
#: Open files never given to connections: the database, Redis and the logs can always
#: open theirs (:mod:`dispatch.doorman`).
RESERVED_FILES = 256


def raise_open_files() -> int:
    """Raise the soft open-files limit to the hard one: each worker is a socket, and
    the usual soft limit (1,024) would cap a broker at about a thousand workers.
    Returns the limit; says how many workers it allows, and warns when that is few."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard,
                        exc)
    if soft == resource.RLIM_INFINITY:
        return soft
    workers = max(0, soft - RESERVED_FILES)
    if workers < 10_000:
        log.warning("open-files limit %d: room for about %d worker connections in this "
                    "process; raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd) for "
                    "more", soft, workers)
    else:
        log.info("open-files limit %d: room for about %d worker connections", soft, workers)
    return soft


def quiet_autobahn_debug() -> None:
    """autobahn (daphne's websocket layer) formats its debug lines before it knows
    they are dropped: colour codes for two names on every frame read and written, a
    pretty-printed settings list for every connection (12% of the broker's CPU while
    a fleet registers). Unless its debug log is on, those formatters return ''."""
    import txaio
    from autobahn.twisted import websocket as tx_websocket
    from autobahn.websocket import protocol as ws_protocol

    if txaio.get_global_log_level() in ("debug", "trace"):
        return

    def unformatted(*_args: Any, **_kwargs: Any) -> str:
        return ""

    for module in (ws_protocol, tx_websocket):
        for name in ("hltype", "hlval", "hlid", "pformat"):
            if hasattr(module, name):
                setattr(module, name, unformatted)


def finish_loop(wait: float = 2.0) -> None:
    """Close daphne's event loop the way ``asyncio.run`` does: no task outlives it.

    daphne (4.2.3) cancels the application instances at shutdown but stops at the
    first connection that has none yet (``KeyError: 'application_instance'`` in
    ``kill_all_applications``: the HTTP half of a websocket handshake of the last
    second), so it waits for none of them, and the reactor stops with some pending.
    A coroutine still pending at interpreter exit is closed by the garbage collector
    after asyncio's C module is gone: on Python 3.11 before 3.11.8 that is a
    segmentation fault (exit 139; CPython gh-113566, a Future's repr called through
    a freed pointer while ``Queue.get`` cleans up). Found with gdb: the frames were
    ``_PyGen_Finalize`` -> ``asyncio/queues.py`` ``get`` -> ``deque_remove``.
    """
    from daphne.server import twisted_loop as loop

    left = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if left:
        log.debug("cancelling %d task(s) left at shutdown: %s", len(left),
                  ", ".join(t.get_name() for t in left))
        for task in left:
            task.cancel()
        _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=wait))
        for task in stuck:
            log.warning("task %s did not stop when cancelled", task.get_name())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


def start_schedules() -> None:
    """Fire the periodic schedules that fall due from this process too (each due time
    once in the cluster: :mod:`dispatch.core.scheduler`)."""
    from daphne.server import twisted_loop as loop

    from .core.scheduler import get_scheduler

    loop.create_task(get_scheduler(), name="dispatch-schedules-start")


def graceful_stop_on_signals(grace: float) -> None:
    """SIGTERM/SIGINT: drain (up to ``grace`` seconds), then stop; a second one stops now."""
    from daphne.server import twisted_loop as loop
    from twisted.internet import reactor

    from workers import protocol
    from workers.protocol import CloseCode

    from .auth import get_guard, stop_guard
    from .core.dispatcher import get_dispatcher, stop_dispatcher
    from .core.scheduler import stop_scheduler

    stopping: list[asyncio.Task[None]] = []

    async def drain_and_stop() -> None:
        try:
            await stop_scheduler()  # fires no more; a firing under way is handed over
            dispatcher = await get_dispatcher()
            if dispatcher.keeper.store is not None:
                log.warning("stopping: what is in flight is handed over (job store), and "
                            "its workers go on with it")
                # First, so that no request comes meanwhile: they come back (here once
                # it is back, or to another process) and attach to their requests. New
                # connections are turned away the same way.
                dispatcher.handing_over = True
                await (await get_guard()).close_all("requester", CloseCode.SHUTTING_DOWN,
                                                    protocol.SHUTTING_DOWN)
            else:
                log.warning("stopping: finishing requests in flight (up to %.0fs)", grace)
            await dispatcher.drain(grace)
            await stop_dispatcher()  # commits the job store (without one: answers all)
            await stop_guard()
        except Exception:
            log.exception("graceful stop failed; stopping now")
        finally:
            reactor.stop()

    def on_signal() -> None:
        if stopping:
            log.warning("stopping now")
            reactor.stop()
        else:
            stopping.append(loop.create_task(drain_and_stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
