"""``python manage.py runbroker``: daphne serving the broker on its three ports."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import subprocess
import sys
from typing import Any

from django.conf import settings

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from dispatch import conf
from dispatch.core.balancing import STRATEGIES

log = logging.getLogger("dispatch.runbroker")


class Command(BaseCommand):
    help = ("Run the broker: worker socket, requester socket and HTTP (admin, /healthz, "
            "control API) served by daphne. Applies database migrations first.")
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None,
                            help=f"interface to listen on (default {conf.get('HOST')}; "
                                 "0.0.0.0 for every interface)")
        parser.add_argument("--worker-port", type=int, default=None,
                            help=f"port for workers (default {conf.get('WORKER_PORT')})")
        parser.add_argument("--requester-port", type=int, default=None,
                            help=f"port for requesters (default {conf.get('REQUESTER_PORT')})")
        parser.add_argument("--http-port", type=int, default=None,
                            help=f"port for HTTP: admin, /healthz, control API "
                                 f"(default {conf.get('HTTP_PORT')})")
        parser.add_argument("--strategy", choices=sorted(STRATEGIES), default=None,
                            help=f"load balancing strategy (default {conf.get('STRATEGY')})")
        parser.add_argument("--timeout", type=float, default=None,
                            help=f"seconds before 'Worker response timeout' "
                                 f"(default {conf.get('TIMEOUT')})")
        parser.add_argument("--processes", type=int, default=1,
                            help="broker processes to start (default 1). More than one needs "
                                 "REDIS_URL; process i listens on each port + i x --port-step")
        parser.add_argument("--port-step", type=int, default=10,
                            help="port offset between processes with --processes (default 10)")
        parser.add_argument("--no-migrate", action="store_true",
                            help="do not apply database migrations at start")

    def handle(self, *args: object, **options: object) -> None:
        overrides = {
            "HOST": options["host"], "WORKER_PORT": options["worker_port"],
            "REQUESTER_PORT": options["requester_port"], "HTTP_PORT": options["http_port"],
            "STRATEGY": options["strategy"], "TIMEOUT": options["timeout"],
        }
        conf.override(**{k: v for k, v in overrides.items() if v is not None})
        ports = [conf.get("WORKER_PORT"), conf.get("REQUESTER_PORT"), conf.get("HTTP_PORT")]
        if len(set(ports)) != 3:
            raise CommandError(f"The three ports must differ, got {ports}")
        check_secret_key(conf.get("HOST"))
        processes = options["processes"]
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        if processes > 1 and not settings.REDIS:
            raise CommandError("Several processes share their workers through Redis: "
                               "set REDIS_URL (e.g. redis://127.0.0.1:6379/0) or REDIS_SENTINELS")
        if not options["no_migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        if processes == 1:
            serve(conf.get("HOST"), ports, self.stdout.write)
            return
        step = options["port_step"]
        every_port = [port + i * step for port in ports for i in range(processes)]
        if step < 1 or len(set(every_port)) < len(every_port):
            raise CommandError(f"--port-step {step} makes the processes' ports overlap "
                               f"({ports}); choose a larger step or ports further apart")
        sys.exit(supervise([
            [sys.executable, "manage.py", "runbroker", "--no-migrate",
             "--host", conf.get("HOST"), "--strategy", conf.get("STRATEGY"),
             "--timeout", str(conf.get("TIMEOUT")),
             "--worker-port", str(ports[0] + i * step),
             "--requester-port", str(ports[1] + i * step),
             "--http-port", str(ports[2] + i * step)]
            for i in range(processes)], self.stdout.write))


def check_secret_key(host: str) -> None:
    """Refuse the development SECRET_KEY on a broker others can reach (DEBUG off)."""
    try:
        local = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        local = host == "localhost"
    if not local and not settings.DEBUG and \
            settings.SECRET_KEY == settings.DEVELOPMENT_SECRET_KEY:
        raise CommandError(
            f"Refusing to listen on {host} with the development SECRET_KEY: set "
            "DJANGO_SECRET_KEY to a long random value (python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))'), or listen on 127.0.0.1")


def supervise(commands: list[list[str]], say: Any) -> int:
    """Run one broker process per command until SIGINT/SIGTERM, passing signals on.

    A process manager (systemd, supervisord) does this better in production: this
    is for one machine and for trying a cluster out. A child that dies is logged,
    not restarted; the others keep serving.
    """
    children = [subprocess.Popen(cmd, cwd=settings.BASE_DIR) for cmd in commands]
    say(f"Started {len(children)} broker processes: pids "
        f"{', '.join(str(c.pid) for c in children)}")

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = []
    for child in children:
        codes.append(child.wait())
        if codes[-1] not in (0, -signal.SIGTERM, -signal.SIGINT):
            log.error("broker process %d exited with %d", child.pid, codes[-1])
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1


def serve(host: str, ports: list[int], say: object) -> None:
    """Run daphne until SIGINT/SIGTERM; ``say`` prints the ready line."""
    # daphne installs Twisted's asyncio reactor when imported: import it first.
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server

    from brokersite.asgi import application
    from dispatch.control.actions import load_action_modules

    load_action_modules()
    worker_port, requester_port, http_port = ports
    endpoints = [e for port in ports
                 for e in build_endpoint_description_strings(host=host, port=port)]
    limit = conf.get("MAX_MESSAGE_BYTES")

    def ready() -> None:
        graceful_stop_on_signals(conf.get("SHUTDOWN_GRACE"))
        say(f"Broker ready: workers ws://{host}:{worker_port}  "  # type: ignore[operator]
            f"requesters ws://{host}:{requester_port}  http://{host}:{http_port}  "
            f"(strategy {conf.get('STRATEGY')}, timeout {conf.get('TIMEOUT')}s, "
            f"process {conf.process_name()})")

    Server(
        application=application,
        endpoints=endpoints,
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
    ).run()
    finish_loop()
    log.info("broker stopped")


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


def graceful_stop_on_signals(grace: float) -> None:
    """SIGTERM/SIGINT: drain (up to ``grace`` seconds), then stop; a second one stops now."""
    from daphne.server import twisted_loop as loop
    from twisted.internet import reactor

    from dispatch.auth import stop_guard
    from dispatch.core.dispatcher import get_dispatcher, stop_dispatcher

    stopping: list[asyncio.Task[None]] = []

    async def drain_and_stop() -> None:
        try:
            log.warning("stopping: finishing requests in flight (up to %.0fs)", grace)
            await (await get_dispatcher()).drain(grace)
            await stop_dispatcher()  # answers what is left, flushes history
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
