"""``python manage.py runbroker``: daphne serving the broker on its three ports."""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError, connection

from dispatch import conf
from dispatch.balancing import STRATEGIES
from dispatch.server import CannotListen, serve, supervise


class Command(BaseCommand):
    help = ("Run the broker: worker socket, requester socket and HTTP (admin, /healthz, "
            "control API) served by daphne. Applies database migrations first. Exits 1, "
            "saying why in one line, when a port cannot be listened on.")
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=None,
                            help=f"interface to listen on (default {conf.get('HOST')}; "
                                 "0.0.0.0 for every interface)")
        parser.add_argument("--worker-port", type=int, default=None,
                            help=f"port for workers (default {conf.get('WORKER_PORT')}; "
                                 "0: one the system chooses, see --ports-file)")
        parser.add_argument("--requester-port", type=int, default=None,
                            help=f"port for requesters (default {conf.get('REQUESTER_PORT')}; "
                                 "0: one the system chooses)")
        parser.add_argument("--http-port", type=int, default=None,
                            help=f"port for HTTP: admin, /healthz, control API "
                                 f"(default {conf.get('HTTP_PORT')}; 0: one the system "
                                 "chooses)")
        parser.add_argument("--ports-file", metavar="PATH", default=None,
                            help="once every port listens, write them to PATH as JSON "
                                 '({"worker": 8765, "requester": 8766, "http": 8000, "pid": '
                                 '...}; with --processes, {"processes": [one such object per '
                                 "process]})")
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
        names = ("WORKER_PORT", "REQUESTER_PORT", "HTTP_PORT")
        asked = [options["worker_port"], options["requester_port"], options["http_port"]]
        if any(port is not None and not 0 <= port <= 65535 for port in asked):
            raise CommandError(f"Ports are 0 to 65535 (0: any free one), got {asked}")
        overrides = {
            "HOST": options["host"], "STRATEGY": options["strategy"],
            "TIMEOUT": options["timeout"],
            **{name: port for name, port in zip(names, asked) if port},  # 0: chosen later
        }
        conf.override(**{k: v for k, v in overrides.items() if v is not None})
        ports = [0 if port == 0 else conf.get(name) for name, port in zip(names, asked)]
        chosen = [port for port in ports if port]
        if len(set(chosen)) != len(chosen):
            raise CommandError(f"The three ports must differ, got {ports}")
        check_secret_key(conf.get("HOST"))
        processes = options["processes"]
        if processes < 1:
            raise CommandError("--processes must be at least 1")
        if processes > 1 and not settings.REDIS:
            raise CommandError("Several processes share their workers through Redis: "
                               "set REDIS_URL (e.g. redis://127.0.0.1:6379/0) or REDIS_SENTINELS")
        if processes > 1 and 0 in ports:
            raise CommandError("--processes derives each process's ports from the ports "
                               "given (port + i x --port-step): give them, not 0")
        if settings.REDIS:
            check_redis()
        elif processes == 1:
            hold_database()
        if not options["no_migrate"]:
            migrate()
        if processes == 1:
            try:
                serve(conf.get("HOST"), ports, self.stdout.write, options["ports_file"])
            except CannotListen as exc:
                raise CommandError(f"Cannot listen, not started: {exc}") from None
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
            for i in range(processes)], self.stdout.write, options["ports_file"]))


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


def migrate() -> None:
    """Apply migrations; a database that cannot be reached is one line (which database,
    what it said, what to check), not a driver's traceback."""
    try:
        call_command("migrate", interactive=False, verbosity=0)
    except OperationalError as exc:
        where = connection.settings_dict
        said = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CommandError(
            f"Cannot use the database {where['NAME']} ({where['ENGINE'].rsplit('.', 1)[-1]}"
            f"{', host ' + where['HOST'] if where.get('HOST') else ''}): {said}. Check "
            "DATABASE_URL; a PostgreSQL role and database must exist first "
            "(docs/scaling.md)") from None


def check_redis() -> None:
    """Redis reachable before the broker says it is ready: one line saying which and
    why, not "Broker ready" and warnings half a minute later."""
    import asyncio

    async def ping() -> None:
        connection = settings.REDIS.connect(socket_connect_timeout=3, socket_timeout=3)
        try:
            await connection.client.ping()
        finally:
            await connection.close()

    try:
        asyncio.run(ping())
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is said so
        raise CommandError(f"Cannot reach Redis ({settings.REDIS}): "
                           f"{type(exc).__name__}: {str(exc).rstrip('.')}. Check REDIS_URL (or "
                           "REDIS_SENTINELS); without it the broker runs alone") from None


#: Held for the process's life: the lock on its SQLite file (see hold_database).
_held: list[Any] = []


def hold_database() -> None:
    """One broker on an SQLite file: a second would take the first's requests over
    and mark its workers offline. (In a cluster, Redis tells the processes apart.)"""
    import fcntl

    where = connection.settings_dict
    if where["ENGINE"].rsplit(".", 1)[-1] != "sqlite3" or str(where["NAME"]) == ":memory:":
        return
    lock = open(f"{where['NAME']}.lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise CommandError(f"Another broker ({holder}) runs on the database {where['NAME']}: "
                           "stop it first, or give this one its own (DATABASE_URL="
                           "sqlite:////path/other.sqlite3); several processes share a "
                           "database with Redis (docs/scaling.md)") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    _held.append(lock)
