"""A broker that is told to stop, stops cleanly: exit 0, every time, with work served.

A process manager records a crash for any other exit status (and may write a core
dump). These tests stop a real broker right after it served a request, with a
requester still connected, several times in a row: the case that used to end in a
segmentation fault (exit 139) at interpreter exit.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.procs import Broker, WorkerProc, scaled, wait_for
from tests.rawws import RawClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROUNDS = 6


@pytest.mark.heavy  # (slow on a 2-core machine: in CI and with --heavy)
def test_sigterm_and_sigint_exit_0_right_after_serving(broker_factory, tmp_path) -> None:
    """The requester is a raw socket that stays open until the broker has exited (a
    library client would have closed politely, or waited on its own close)."""
    for round_ in range(ROUNDS):
        stop_signal = signal.SIGTERM if round_ % 2 == 0 else signal.SIGINT
        broker: Broker = broker_factory(env={"BROKER_SHUTDOWN_GRACE": "2"})
        worker = WorkerProc(broker, f"w{round_}").start()
        try:
            wait_for(lambda: len(broker.workers()) == 1, 15, "the worker")
            with RawClient(broker.host, broker.requester_port,
                           timeout=scaled(10)) as requester:  # connected throughout
                requester.send_text(json.dumps({"request_id": f"last-{round_}",
                                                "command": "echo",
                                                "data": {"message": "last"}}))
                answer = json.loads(requester.recv().text)
                assert answer["data"] == "Echo: last", answer
                started = time.monotonic()
                broker.proc.send_signal(stop_signal)  # type: ignore[union-attr]
                code = broker.proc.wait(scaled(30))  # type: ignore[union-attr]
                took = time.monotonic() - started
        finally:
            worker.stop(signal.SIGKILL)
        log = broker.log()
        assert code == 0, f"round {round_} ({stop_signal.name}): exit {code}\n{log}"
        assert "broker stopped" in log and "Traceback" not in log, log
        assert took < 10, took
