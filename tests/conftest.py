"""Shared fixtures: real broker and worker processes for integration tests."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from tests.procs import Broker, WorkerProc, wait_for

pytest_plugins = ["tests.redis_fixture", "tests.sentinel_fixture"]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers with ``make(env={...}, args=[...])``; all are stopped afterwards."""
    started: list[Broker] = []

    def make(env: dict[str, str] | None = None, args: list[str] | None = None) -> Broker:
        broker = Broker(tmp_path, env=env or {}, args=args or [])
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop(signal.SIGKILL)


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@pytest.fixture
def spawn_worker(request: pytest.FixtureRequest) -> Iterator[Callable[..., WorkerProc]]:
    """Start ``python -m workers`` processes against ``target`` (default: the ``broker``
    fixture, started only then); ``wait=True`` waits until the broker lists them."""
    started: list[WorkerProc] = []

    def spawn(name: str, *args: str, wait: bool = True, target: Broker | None = None,
              env: dict[str, str] | None = None) -> WorkerProc:
        broker = target or request.getfixturevalue("broker")
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
