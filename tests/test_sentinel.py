"""Redis fails over under load: brokers follow the promoted replica by themselves.

A master, a replica and three sentinels (tests/sentinel_fixture.py); two broker
processes that know only the sentinels; a worker on each; requesters on both,
sending all the time. The master is killed with ``kill -9``. Every request must be
answered, with the worker's result or an explicit error (0 silent), and service
must come back by itself. The figures are attached to the report and logged:
``./test.sh tests/test_sentinel.py -o log_cli=true -o log_cli_level=INFO``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

import pytest

from tests.procs import Broker, WorkerProc, wait_for
from tests.sentinel_fixture import SentinelCluster
from workers.requester import Requester

pytestmark = [pytest.mark.heavy, pytest.mark.integration, pytest.mark.timeout(180)]
log = logging.getLogger("tests.sentinel")

CALLERS = 8  # concurrent callers per requester
BEFORE, AFTER = 3.0, 15.0  # seconds of load before and after the kill


async def load(url: str, outcomes: list[tuple[float, str]], stop: asyncio.Event) -> None:
    """Callers that send echo requests until ``stop``; each outcome is (time, what)."""
    async with Requester(url, margin=5.0) as requester:

        async def caller() -> None:
            while not stop.is_set():
                try:
                    answer = await requester.request("echo", {"message": "x"}, timeout=5)
                    what = "ok" if answer.success else f"error: {answer.error}"
                except TimeoutError:
                    what = "silent"  # no answer at all within timeout + margin
                outcomes.append((time.monotonic(), what))
                if what != "ok":
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))


def test_brokers_follow_a_sentinel_failover(sentinel_cluster: SentinelCluster, tmp_path,
                                            record_property) -> None:
    env = {**sentinel_cluster.env, "BROKER_REDIS_PREFIX": f"test-{uuid.uuid4().hex[:8]}"}
    brokers = [Broker(tmp_path, env=env).start() for _ in range(2)]
    workers = [WorkerProc(b, f"w{i}").start() for i, b in enumerate(brokers)]
    try:
        wait_for(lambda: len(brokers[0].workers()) == 2, 20, "both workers, seen by both")

        async def scenario() -> tuple[list[tuple[float, str]], float, float]:
            outcomes: list[tuple[float, str]] = []
            stop = asyncio.Event()
            running = [asyncio.ensure_future(load(b.requester_url, outcomes, stop))
                       for b in brokers]
            await asyncio.sleep(BEFORE)
            killed = time.monotonic()
            sentinel_cluster.kill_master()
            failover = await asyncio.to_thread(sentinel_cluster.wait_failover)
            await asyncio.sleep(max(0.0, AFTER - (time.monotonic() - killed)))
            stop.set()
            await asyncio.wait_for(asyncio.gather(*running), 30)
            return outcomes, killed, failover

        outcomes, killed, failover = asyncio.run(scenario())
    finally:
        for worker in workers:
            worker.stop()
        for broker in brokers:
            broker.stop()
    kinds = Counter("ok" if what == "ok" else "silent" if what == "silent"
                    else what.split(":")[1].strip() for _, what in outcomes)
    failed_after = [t - killed for t, what in outcomes if what != "ok" and t > killed]
    back_after = max(failed_after, default=0.0)  # the last failure: service is back after it
    ok_at_end = sum(1 for t, what in outcomes if what == "ok" and t - killed > back_after)
    figures = {"requests": len(outcomes), "outcomes": dict(kinds),
               "sentinels_switched_after_s": round(failover, 2),
               "service_back_after_s": round(back_after, 2), "ok_after_recovery": ok_at_end}
    for name, value in figures.items():
        record_property(name, value)
    log.info("figures: %s", figures)
    assert kinds["silent"] == 0, figures
    assert kinds["ok"] > 0 and ok_at_end > 100, figures
    assert back_after < 10, figures
    for broker in brokers:
        assert "Traceback" not in broker.log(), broker.log()
