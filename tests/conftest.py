"""Shared fixtures: real broker and worker processes for integration tests.

- ``broker``: a broker of the test's own (for tests that change its state: kill it,
  restart it, give it credentials or settings); ``broker_factory`` makes more, with
  ``env``/``args``.
- ``shared_broker``: one broker for the session, handed to tests whose effects end
  with them (their workers are stopped afterwards, and the next test gets it only
  once it is idle again: no worker, nothing pending; else a fresh one).
- ``spawn_worker``: ``python -m workers`` processes against either.
- ``--heavy``: also run the system tests marked ``heavy`` (wheel build, Sentinel,
  Autobahn, browser, bench harness, soak, the slowest end-to-end tests); without it
  they are skipped, saying so.
- ``TEST_TIME_FACTOR``: multiplies every bounded wait and every test's timeout.
"""

from __future__ import annotations

import signal
import warnings
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from tests.procs import TIME_FACTOR, Broker, WorkerProc, wait_for

pytest_plugins = ["tests.redis_fixture", "tests.sentinel_fixture"]

HEAVY_REASON = ("heavy system test: ./test.sh --heavy runs it (as CI does)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--heavy", action="store_true", default=False,
                     help="also run the heavy system tests (marker 'heavy'): the wheel "
                          "build, Sentinel failover, Autobahn, the browser, the bench "
                          "harness, the soak, the slowest end-to-end tests; -m heavy runs "
                          "only them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    heavy = config.getoption("--heavy")
    default_timeout = float(config.getini("timeout") or 0)
    for item in items:
        if not heavy and item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.skip(reason=HEAVY_REASON))
        if TIME_FACTOR != 1:
            marker = item.get_closest_marker("timeout")
            base = float(marker.args[0]) if marker and marker.args else default_timeout
            if base:
                item.add_marker(pytest.mark.timeout(base * TIME_FACTOR), append=False)


# --------------------------------------------------------------------------- brokers


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers with ``make(env={...}, args=[...])``; all are stopped afterwards.
    Brokers of one test share its database (a restarted broker finds its rows)."""
    started: list[Broker] = []

    def make(env: dict[str, str] | None = None, args: list[str] | None = None,
             open_files: int | None = None) -> Broker:
        broker = Broker(tmp_path, env=env or {}, args=args or [], open_files=open_files)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop(signal.SIGKILL)


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    """A broker of this test's own."""
    return broker_factory()


class SharedBroker:
    """The session's shared broker: started on first use, started again when a test
    left it dead or busy."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker: Broker | None = None

    def get(self) -> Broker:
        if self.broker is None or not self.broker.running:
            self.stop()
            self.broker = Broker(self.workdir).start()
        return self.broker

    def tidy(self) -> None:
        """Stop the workers this test started; keep the broker if it is idle soon."""
        broker = self.broker
        if broker is None:
            return
        for worker in broker.children:
            worker.stop(signal.SIGKILL)
        broker.children.clear()
        if not broker.running:
            return

        def idle() -> bool:
            health = broker.get("/healthz")
            return (health["workers"], health["pending"], health["waiting"]) == (0, 0, 0)

        try:
            wait_for(idle, 5, "the shared broker to be idle")
        except TimeoutError as exc:  # the next test gets a fresh one; say so in the summary
            warnings.warn(f"shared broker not idle after the test, starting another: {exc}",
                          stacklevel=1)
            self.stop()

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop(signal.SIGKILL)
            self.broker = None


@pytest.fixture(scope="session")
def _shared_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedBroker]:
    shared = SharedBroker(tmp_path_factory.mktemp("shared-broker"))
    yield shared
    shared.stop()


@pytest.fixture
def shared_broker(_shared_brokers: SharedBroker) -> Iterator[Broker]:
    """A broker shared with other tests (default settings): for a test that neither
    changes its settings nor stops it, and that reads only its own workers' state."""
    broker = _shared_brokers.get()
    broker.mark_log()
    yield broker
    _shared_brokers.tidy()


@pytest.fixture
def spawn_worker(request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProc]]:
    """Start ``python -m workers`` processes against ``target`` (default: the test's
    ``shared_broker`` if it uses one, else the ``broker`` fixture, started only then);
    ``wait=True`` waits until the broker lists them."""
    started: list[WorkerProc] = []

    def spawn(name: str, *args: str, wait: bool = True, target: Broker | None = None,
              env: dict[str, str] | None = None) -> WorkerProc:
        default = "shared_broker" if "shared_broker" in request.fixturenames else "broker"
        broker = target or request.getfixturevalue(default)
        worker = WorkerProc(broker, name, list(args), env or {}).start()
        started.append(worker)
        if wait:
            wait_for(lambda: any(w["name"] == name for w in broker.workers()),
                     15, f"worker {name} to register\n{worker.log()}")
        return worker

    yield spawn
    for worker in started:
        worker.stop(signal.SIGKILL)


async def close_thread_connections() -> None:
    """Close the DB connection that async code opened in asgiref's shared sync thread.

    The SQLite in-memory test database ignores ``close()``, so that connection would
    outlive the test, and a later test without DB access that touches it in the same
    thread would be refused.
    """
    await sync_to_async(_close_connections, thread_sensitive=True)()


def _close_connections() -> None:
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None:
            BaseDatabaseWrapper.close(conn)  # bypasses the in-memory no-op on purpose


@pytest.fixture
async def async_db(transactional_db: None) -> AsyncIterator[None]:
    """Database access for async tests (consumers load credentials from it)."""
    yield
    await close_thread_connections()

