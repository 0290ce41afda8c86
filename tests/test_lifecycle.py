"""A broker that is told to stop, stops cleanly: exit 0, every time, with work served.

A process manager records a crash for any other exit status (and may write a core
dump). These tests stop a real broker right after it served a request, with a
requester still connected, several times in a row: the case that used to end in a
segmentation fault (exit 139) at interpreter exit.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.procs import Broker, WorkerProc, wait_for
from workers.requester import SyncRequester

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROUNDS = 6


def test_sigterm_and_sigint_exit_0_right_after_serving(broker_factory, tmp_path) -> None:
    for round_ in range(ROUNDS):
        stop_signal = signal.SIGTERM if round_ % 2 == 0 else signal.SIGINT
        broker: Broker = broker_factory(env={"BROKER_SHUTDOWN_GRACE": "2"})
        worker = WorkerProc(broker, f"w{round_}").start()
        try:
            wait_for(lambda: len(broker.workers()) == 1, 15, "the worker")
            with SyncRequester(broker.requester_url) as requester:  # connected throughout
                assert requester.call("echo", message="last") == "Echo: last"
                started = time.monotonic()
                broker.proc.send_signal(stop_signal)  # type: ignore[union-attr]
                code = broker.proc.wait(30)  # type: ignore[union-attr]
                took = time.monotonic() - started
        finally:
            worker.stop(signal.SIGKILL)
        log = broker.log()
        assert code == 0, f"round {round_} ({stop_signal.name}): exit {code}\n{log}"
        assert "broker stopped" in log and "Traceback" not in log, log
        assert took < 10, took
