"""Requests read back from the job store, on a fake clock: no sockets, no database."""

from __future__ import annotations

from dispatch.core.events import Departure
from dispatch.core.recovery import Recovery
from dispatch.core.requests import (Answer, Arm, AwaitWorker, Forward, Request, RequestTable,
                                    Reserve, State)
from dispatch.registry import Reservation
from tests.test_requests import NOW, answer_of, placed, request, worker
from workers.protocol import ErrorCode


def restored(key: str = "k1", command: str = "echo") -> Request:
    """A request as the keeper rebuilds it from its row: nobody watches it yet."""
    req = request(key, command)
    req.watchers = []
    return req


def test_a_queued_request_is_queued_again_and_waits_for_the_fleet_to_come_back() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = restored()
    actions = recovery.restore(req, None, NOW)
    assert [type(a) for a in actions] == [Arm, Reserve] and table.find("a", "rid-k1") == [req]
    assert table.reserved(req, Reservation(None, False), NOW + 1) != []  # no worker yet:
    assert req.state is State.WAITING  # it waits, instead of failing no_workers
    later = NOW + 31  # the grace is over: now nobody offering it means no_workers
    req.state = State.RESERVING
    assert answer_of(table.reserved(req, Reservation(None, False), later)).code == "no_workers"


def test_a_running_request_is_adopted_when_its_worker_reports_it() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = restored()
    actions = recovery.restore(req, "w1", NOW)
    assert [type(a) for a in actions] == [Arm, AwaitWorker] and req.state is State.PLACED
    assert recovery.awaited("w1") == [req] and recovery.awaited("w2") == []
    back = worker("w1")
    recovery.adopt(req, back.worker_id, back.connection, back.inbox)
    assert recovery.awaited("w1") == [] and recovery.not_back("k1") == []  # its timer: no-op
    [answer] = table.replied("k1", "w1", True, "done", None, None, 5.0)
    assert isinstance(answer, Answer) and answer.response.data == "done"  # not sent again


def test_a_worker_that_does_not_come_back_lost_it_and_it_runs_elsewhere() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = restored()
    recovery.restore(req, "w1", NOW)
    [again] = recovery.not_back("k1")
    assert isinstance(again, Reserve) and req.lost_from == ["w1"]
    [forward] = table.reserved(req, Reservation(worker("w2"), True), NOW + 31)
    assert isinstance(forward, Forward) and forward.worker.worker_id == "w2"


def test_one_that_must_not_run_twice_is_answered_worker_lost_saying_why() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    recovery.restore(restored(), "w1", NOW, retry_safe=False)
    response = answer_of(recovery.not_back("k1"))
    assert response.code == ErrorCode.WORKER_LOST.value
    assert "restarted" in response.error and "not idempotent" in response.error


def test_a_dropped_connection_makes_a_job_that_must_not_run_twice_wait_for_its_worker() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = request()
    placed(table, req, worker("w1", no_retry=frozenset({"echo"})))
    [wait] = recovery.away("k1", "w1", Departure.DROPPED)  # type: ignore[misc]
    assert isinstance(wait, AwaitWorker) and recovery.awaited("w1") == [req]
    idempotent = request("k2")
    placed(table, idempotent, worker("w2"))
    assert recovery.away("k2", "w2", Departure.DROPPED) is None  # it may run elsewhere


def test_a_job_its_worker_reports_from_a_new_connection_is_adopted_there() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = request()
    placed(table, req, worker("w1"))
    assert recovery.reported("w1", "worker.w1", {"k1"}) == []  # the same connection
    [moved] = recovery.reported("w1", "worker.w1-again", {"k1"})
    recovery.adopt(moved, "w1", "worker.w1-again", "inbox.2")
    assert [(p.connection, p.inbox) for p in req.placements] == [("worker.w1-again",
                                                                  "inbox.2")]


def test_a_worker_sent_away_by_a_leaving_process_is_waited_for_whatever_its_command() -> None:
    table = RequestTable()
    recovery = Recovery(table)
    req = request()
    placed(table, req, worker("w1"))
    [wait] = recovery.away("k1", "w1", Departure.SENT_AWAY)  # type: ignore[misc]
    assert isinstance(wait, AwaitWorker) and wait.grace == 30.0
    assert recovery.away("k1", "w1", Departure.CLOSED) is None  # closed for cause: lost


def test_answers_sent_to_other_processes_are_kept_a_while_and_bounded() -> None:
    """What a takeover finds of an answer whose process died: kept KEEP_SECONDS, within
    a byte budget, oldest first out; taken once."""
    from dispatch.core.events import Reply
    from dispatch.core.sent import SentReplies

    now = [0.0]
    sent = SentReplies(seconds=60, max_bytes=10_000, clock=lambda: now[0])
    for i in range(5):
        sent.keep(Reply(f"k{i}", "w1", True, "x" * 1000, None, 1.0))
    assert len(sent) == 5 and 5000 < sent.bytes < 7000
    sent.keep(Reply("big", "w1", True, {"pad": "y" * 6000}, None, 1.0))
    assert len(sent) == 4 and sent.bytes <= 10_000  # the two oldest went
    assert sent.take("k1") is None and sent.take("k4").data == "x" * 1000
    assert sent.take("k4") is None  # taken once
    now[0] = 61.0
    sent.keep(Reply("late", "w1", True, None, None, 1.0))
    assert len(sent) == 1 and sent.take("late") is not None and sent.bytes == 0


def test_what_waits_for_a_takeover_is_kept_longer_than_a_takeover_takes(settings) -> None:
    """With the default heartbeat (5 s, 3 misses) another process takes a dead one's
    requests over up to ~65 s after it died: a worker's jobs of before wait that long
    for it (ADOPT_GRACE alone, 30 s, let their answers go after 30 s: every one of 10
    answered timeout), and so do the answers passed to the dead process."""
    from dispatch.core.connections import WorkerConnections
    from dispatch.core.liveness import takeover_seconds
    from dispatch.core.registration import welcome
    from dispatch.registry import WorkerEntry
    from workers.protocol import Feature, Registration

    settings.BROKER = {"HEARTBEAT_INTERVAL": 5.0, "HEARTBEAT_MISSES": 3, "ADOPT_GRACE": 30.0}
    assert takeover_seconds() == 65.0
    reg = Registration("w1", "w1", ["echo"], features=frozenset({Feature.RESUME}))
    answer = welcome(reg, WorkerEntry("w1", "w1", "c1", frozenset({"echo"})), [])
    assert answer["adopt_grace"] == 65.0
    connections = WorkerConnections(_Exchange(), None, None, "p", None)  # type: ignore[arg-type]
    assert connections.sent is not None and connections.sent.seconds == 95.0


class _Exchange:
    inbox = "inbox"

    def on(self, *_args: object) -> None:
        pass


async def test_a_slow_takeover_round_does_not_delay_this_process_s_own_life(
        settings, monkeypatch) -> None:
    """Tidying up after dead processes (taking their requests over, looking again for
    what attaches wait for) may take seconds; the beat that says this process lives
    must not wait for it, or the others take the living for dead (a takeover 75 s
    late in an attack, past the time a worker keeps its answers)."""
    import asyncio
    import time

    from dispatch.core import liveness as liveness_module
    from dispatch.core.liveness import Liveness

    settings.BROKER = {"HEARTBEAT_INTERVAL": 0.05, "HEARTBEAT_MISSES": 1}
    beats: list[float] = []

    class Registry:
        local = False

        async def process_alive(self, process: str, ttl: float) -> None:
            beats.append(time.monotonic())

        async def live_processes(self) -> set[str]:
            return {"p"}

        async def process_gone(self, process: str) -> None:
            pass

    async def nothing(**_: object) -> None:
        pass

    async def slow_reap(live: set[str]) -> None:
        await asyncio.sleep(1.0)

    monkeypatch.setattr(liveness_module, "mark_processes_offline", nothing)
    life = Liveness(Registry(), "p", slow_reap)  # type: ignore[arg-type]
    await life.start()
    await asyncio.sleep(0.6)
    await life.stop()
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert len(beats) >= 8 and max(gaps) < 0.3, gaps


async def test_waiting_attaches_are_looked_for_again_side_by_side() -> None:
    """Ten attaches waiting for a dead process's requests, each looked for with a
    question that waits a second when nobody has it: one second, not ten."""
    import asyncio
    import time

    from dispatch.core.lookup import Lookup

    lookup = Lookup.__new__(Lookup)
    lookup.waiting = {("o", f"r{i}"): (object(), False) for i in range(10)}  # type: ignore

    async def attach(owner: str, request_id: str, sink: object, stream: bool) -> bool:
        await asyncio.sleep(1.0)
        return True

    lookup.attach = attach  # type: ignore[method-assign]
    started = time.monotonic()
    await lookup.look_again()
    assert time.monotonic() - started < 2.0 and lookup.waiting == {}
