"""The request table without sockets: every transition, driven with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from dispatch.core.requests import (Answer, Arm, ArmHedge, CancelOnWorker, Forward, GiveBack, Notify,
                                    Request, RequestTable, Reserve, State, Wake, Watcher)
from dispatch.registry import Reservation, WorkerEntry
from workers.protocol import ApiResponse, ErrorCode

NOW = 1000.0


class Nobody:
    """A sink the table must never call itself (the driver does)."""

    async def answer(self, response: ApiResponse, text: str) -> None:
        raise AssertionError("the table must not answer by itself")

    async def event(self, request_id: str, text: str, **kwargs: Any) -> None:
        raise AssertionError("the table must not send events by itself")


def request(key: str = "k1", command: str = "echo", *, target: str | None = None,
            timeout: float = 30.0, owner: str = "a", priority: int = 0,
            stream: bool = False) -> Request:
    return Request(key, command, {"message": "hi"}, [Watcher(Nobody(), stream)],
                   f"rid-{key}", "127.0.0.1:1", NOW + timeout, 0.0, target=target,
                   owner=owner, priority=priority)


def worker(worker_id: str = "w1", *, no_retry: frozenset[str] = frozenset()) -> WorkerEntry:
    return WorkerEntry(worker_id, worker_id, f"worker.{worker_id}", frozenset({"echo"}),
                       no_retry=no_retry, inbox="inbox.1")


def placed(table: RequestTable, req: Request, on: WorkerEntry) -> Forward:
    [reserve] = [a for a in table.submit(req) if isinstance(a, Reserve)]
    [forward] = table.reserved(reserve.requests[0], Reservation(on, True), NOW)
    assert isinstance(forward, Forward)
    return forward


def answer_of(actions: list[Any]) -> ApiResponse:
    [answer] = [a for a in actions if isinstance(a, Answer)]
    return answer.response


def test_submit_arms_the_deadline_and_asks_for_a_slot() -> None:
    table = RequestTable()
    req = request()
    actions = table.submit(req)
    assert [type(a) for a in actions] == [Arm, Reserve]
    assert actions[1].requests == [req] and req.state is State.RESERVING and len(table) == 1


def test_a_reserved_slot_forwards_with_the_time_left() -> None:
    table = RequestTable()
    req = request(timeout=10)
    table.submit(req)
    [forward] = table.reserved(req, Reservation(worker(), True), NOW + 4)
    assert isinstance(forward, Forward) and forward.timeout == pytest.approx(6)
    assert (req.state, req.worker_id, req.attempts) == (State.PLACED, "w1", 1)


def test_the_workers_answer_is_the_one_answer() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker())
    response = answer_of(table.replied("k1", "w1", True, "Echo: hi", None, None))
    assert response == ApiResponse("rid-k1", True, "Echo: hi", None, "w1")
    assert len(table) == 0 and req.state is State.DONE
    assert table.replied("k1", "w1", True, "again", None, None) == []  # a duplicate
    assert table.stats["late"] == 1


def test_a_failure_answer_keeps_its_code_or_says_worker_error() -> None:
    """The code comes vetted by the worker's link (a worker cannot borrow the broker's
    codes: tests/test_consumers.py), or is the broker's own about the worker's answer
    (too_large); none, or one nobody knows, reads worker_error."""
    table = RequestTable()
    for key, code, expected in (("a", "command_error", "command_error"),
                                ("b", None, "worker_error"), ("c", "made-up", "worker_error"),
                                ("d", "too_large", "too_large")):
        placed(table, request(key), worker())
        assert answer_of(table.replied(key, "w1", False, None, "nope", code)).code == expected


def test_an_answer_from_another_worker_is_dropped() -> None:
    table = RequestTable()
    placed(table, request(), worker("w1"))
    assert table.replied("k1", "w2", True, "forged", None, None) == []
    assert len(table) == 1 and table.stats["late"] == 1


@pytest.mark.parametrize("target, code, text", [
    (None, ErrorCode.NO_WORKERS, "No available workers"),
    ("w9", ErrorCode.UNKNOWN_WORKER, "Unknown worker 'w9'"),
])
def test_nobody_capable_is_answered_at_once(target: str | None, code: ErrorCode,
                                            text: str) -> None:
    table = RequestTable()
    req = request(target=target)
    table.submit(req)
    response = answer_of(table.reserved(req, Reservation(None, False), NOW))
    assert (response.error, response.code) == (text, code.value) and len(table) == 0


def test_all_busy_waits_in_a_bounded_queue() -> None:
    table = RequestTable()
    with override_settings(BROKER={"QUEUE_LIMIT": 1}):
        first, second = request("a"), request("b")
        for req in (first, second):
            table.submit(req)
        assert table.reserved(first, Reservation(None, True), NOW) == [Wake()]
        assert first.state is State.WAITING and len(table.waiting) == 1
        response = answer_of(table.reserved(second, Reservation(None, True), NOW))
        assert response.code == "all_busy" and table.stats["queue_full"] == 1
    assert table.take_waiting() == [first] and first.state is State.RESERVING
    assert not table.waiting


def test_a_full_queue_is_shared_between_credentials() -> None:
    """B fills the queue and leaves; A's newcomer pushes out B's newest (answered
    all_busy, saying why) instead of being refused; B's next newcomer is refused."""
    table = RequestTable()
    with override_settings(BROKER={"QUEUE_LIMIT": 3}):
        bs = [request(f"b{i}", owner="b") for i in range(3)]
        table.submit(bs[0])
        table.reserved(bs[0], Reservation(None, True), NOW)  # no free slot: it waits
        for req in bs[1:]:
            table.submit(req)  # others wait: no jumping the queue
        a = request("a1", owner="a")
        pushed = answer_of(table.submit(a))
        assert pushed.request_id == "rid-b2" and pushed.code == "all_busy"
        assert "shared between credentials" in pushed.error
        assert a.state is State.WAITING and len(table.waiting) == 3
        late = request("b3", owner="b")  # b holds 2, a 1: b may not push a out
        assert answer_of(table.submit(late)).request_id == "rid-b3"
        assert table.take_waiting() == [bs[0], a, bs[1]]  # round-robin by owner


def test_what_a_credential_holds_is_counted_until_answered() -> None:
    table = RequestTable()
    reqs = [request(f"k{i}", owner="a") for i in range(3)]
    for req in reqs:
        req.cost = 100
        table.submit(req)
    assert (table.held.requests["a"], table.held.bytes["a"]) == (3, 300)
    table.unwatch([r.key for r in reqs], reqs[0].watchers[0].sink)  # its connection left
    assert table.held.requests["a"] == 3  # they go on, and still count
    for req in reqs:
        table.expired(req.key)
    assert not table.held.requests and not table.held.bytes


def test_a_lost_worker_means_another_try_then_worker_lost() -> None:
    table = RequestTable()
    req = request()
    with override_settings(BROKER={"MAX_RETRIES": 1}):
        placed(table, req, worker("w1"))
        [again] = table.lost("k1", "w1", "connection closed")
        assert isinstance(again, Reserve) and req.state is State.RESERVING
        table.reserved(req, Reservation(worker("w2"), True), NOW)
        response = answer_of(table.lost("k1", "w2", "heartbeat timeout"))
    assert response.code == "worker_lost"
    assert response.error == "Worker lost (heartbeat timeout) after 2 attempts"
    assert table.stats["redispatched"] == 1


def test_a_command_that_must_not_run_twice_is_not_retried() -> None:
    table = RequestTable()
    placed(table, request("k1", "echo"), worker(no_retry=frozenset({"echo"})))
    response = answer_of(table.lost("k1", "w1", "connection closed"))
    assert response.code == "worker_lost" and "is not idempotent" in response.error


def test_lost_after_a_retry_found_nobody_else() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker())
    table.lost("k1", "w1", "connection closed")
    response = answer_of(table.reserved(req, Reservation(None, False), NOW))
    assert response.error == "Worker lost (connection closed) and no other worker offers 'echo'"


def test_a_lost_report_for_another_placement_is_ignored() -> None:
    table = RequestTable()
    placed(table, request(), worker("w1"))
    assert table.lost("k1", "w-old", "connection closed") == []
    assert len(table) == 1


def test_the_deadline_answers_timeout_wherever_the_request_is() -> None:
    for state in ("reserving", "waiting", "placed"):
        table = RequestTable()
        req = request()
        table.submit(req)
        if state == "waiting":
            table.reserved(req, Reservation(None, True), NOW)
        elif state == "placed":
            table.reserved(req, Reservation(worker(), True), NOW)
        response = answer_of(table.expired("k1"))
        assert (response.error, response.code) == ("Worker response timeout", "timeout")
        assert table.expired("k1") == [] and table.stats["timeouts"] == 1


def test_a_slot_reserved_after_the_answer_is_given_back() -> None:
    table = RequestTable()
    req = request()
    table.submit(req)
    table.expired("k1")
    assert table.reserved(req, Reservation(worker(), True), NOW) == [GiveBack("w1")]
    assert table.take_waiting() == []


def test_a_failed_hand_over_gives_the_slot_back_and_answers() -> None:
    table = RequestTable()
    placed(table, request(), worker())
    actions = table.failed_on("k1", "w1", "Broker overloaded", ErrorCode.OVERLOADED)
    assert actions[0] == GiveBack("w1") and answer_of(actions).code == "overloaded"


def test_registry_down_answers_everything_it_was_reserving() -> None:
    table = RequestTable()
    reqs = [request("a"), request("b")]
    for req in reqs:
        table.submit(req)
    responses = [a.response for a in table.give_up(
        reqs, "Broker unavailable: Redis unavailable", ErrorCode.BROKER_UNAVAILABLE)]
    assert [r.code for r in responses] == ["broker_unavailable"] * 2
    assert responses[0].error == "Broker unavailable: Redis unavailable"


def test_a_request_whose_requester_left_goes_on_without_it() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker())
    sink = req.watchers[0].sink
    table.unwatch(["k1", "never-was"], sink)
    assert req.watchers == [] and len(table) == 1
    [answer] = table.replied("k1", "w1", True, "done", None, None)
    assert answer.response.success  # answered (and kept for a re-attach), to nobody


def test_stop_answers_the_rest_and_refuses_new_requests() -> None:
    table = RequestTable()
    placed(table, request("a"), worker())
    table.submit(request("b"))
    assert {answer_of([a]).code for a in table.stop()} == {"shutting_down"}
    assert len(table) == 0
    assert answer_of(table.submit(request("c"))).code == "shutting_down"


def test_placed_lists_what_is_with_workers() -> None:
    table = RequestTable()
    placed(table, request("a"), worker())
    table.submit(request("b"))
    assert [r.key for r in table.placed()] == ["a"]


# --------------------------------------------------------------------------- long jobs


def test_cancel_while_waiting_never_reaches_a_worker() -> None:
    table = RequestTable()
    req = request()
    table.submit(req)
    table.reserved(req, Reservation(None, True), NOW)
    response = answer_of(table.cancel("k1", "cancelled by the requester"))
    assert (response.code, response.error) == ("cancelled",
                                               "Cancelled: cancelled by the requester")
    assert table.take_waiting() == [] and table.stats["cancelled"] == 1


def test_cancel_on_a_worker_tells_it_to_stop_and_answers_now() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker())
    actions = table.cancel("k1", "enough")
    assert actions[0] == CancelOnWorker(req, "enough", req.placements[0]) and answer_of(actions).code == \
        "cancelled"
    assert table.replied("k1", "w1", True, "too late", None, None) == []
    assert table.cancel("k1", "again") == []


def test_cancel_and_attach_find_requests_by_owner_and_id() -> None:
    table = RequestTable()
    mine, theirs = request("k1", owner="a"), request("k2", owner="b")
    mine.request_id = theirs.request_id = "same-id"
    for req in (mine, theirs):
        table.submit(req)
    assert table.find("a", "same-id") == [mine] and table.find("c", "same-id") == []
    assert sorted(r.key for r in table.find(None, "same-id")) == ["k1", "k2"]
    table.cancel("k1", "x")
    assert table.find("a", "same-id") == [] and table.find("b", "same-id") == [theirs]


def test_progress_and_chunks_go_to_watchers_that_asked() -> None:
    table = RequestTable()
    quiet = request("q")
    placed(table, quiet, worker())
    assert table.progress("q", "w1", 0.5, "half") == []
    [chunk] = table.chunk("q", "w1", 0, "part", ack="ack")  # acked, though nobody streams
    assert isinstance(chunk, Notify) and chunk.ack == "ack"
    loud = request("l", stream=True)
    placed(table, loud, worker())
    [note] = table.progress("l", "w1", 0.5, "half")
    assert note.mergeable and '"event":"progress"' in note.text and '"progress":0.5' in note.text
    assert table.progress("l", "w-other", 0.9, None) == []  # not its worker


def test_a_lease_that_ran_out_retries_then_says_lease_expired() -> None:
    from workers.protocol import ErrorCode

    table = RequestTable()
    req = request()
    with override_settings(BROKER={"MAX_RETRIES": 0}):
        placed(table, req, worker())
        response = answer_of(table.lost("k1", "w1", "no sign of life for 61s",
                                        ErrorCode.LEASE_EXPIRED))
    assert response.code == "lease_expired" and response.error.startswith("Lease expired")
    assert req.workers_lost == 1


def test_the_queue_serves_priority_first_then_owners_in_turn() -> None:
    table = RequestTable()
    burst = [request(f"a{i}", owner="a") for i in range(5)]
    other, urgent = request("b0", owner="b"), request("u", owner="c", priority=9)
    for req in [*burst, other, urgent]:
        table.submit(req)
        table.reserved(req, Reservation(None, True), NOW)
    order = [r.key for r in table.take_waiting()]
    assert order[0] == "u" and order.index("b0") <= 2, order
    assert [k for k in order if k.startswith("a")] == [f"a{i}" for i in range(5)]


def test_a_new_request_does_not_jump_the_queue() -> None:
    table = RequestTable()
    first = request("a")
    table.submit(first)
    table.reserved(first, Reservation(None, True), NOW)
    actions = table.submit(request("b"))
    assert [type(a) for a in actions] == [Arm, Wake]  # queued behind, not reserved now
    assert [r.key for r in table.take_waiting()] == ["a", "b"]


# ---------------------------------------------------------------------------- routing


def hedgeable_worker(worker_id: str) -> WorkerEntry:
    entry = worker(worker_id)
    entry.hedge = frozenset({"echo"})
    return entry


def warmed(table: RequestTable, latency_ms: float = 20.0) -> None:
    """Give the table a p95 for 'echo', as answered requests would."""
    for _ in range(30):
        table.hedges.record("echo", latency_ms)


def hedge_due(table: RequestTable) -> Request:
    """Request k1 placed on hedgeable w1 and past its hedge delay: its copy is being
    reserved."""
    warmed(table)
    req = request()
    table.submit(req)
    table.reserved(req, Reservation(hedgeable_worker("w1"), True), NOW)
    table.hedge_due("k1")
    return req


def test_a_failover_is_told_in_the_answer() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker("w1"))
    [reserve] = table.lost("k1", "w1", "connection closed")
    [forward] = table.reserved(req, Reservation(worker("w2"), True), NOW)
    response = answer_of(table.replied("k1", "w2", True, "ok", None, None))
    assert response.route == {"attempts": 2, "failover_from": ["w1"]}
    assert response.to_dict()["failover_from"] == ["w1"]
    first_time = request("k2")
    placed(table, first_time, worker("w1"))
    plain = answer_of(table.replied("k2", "w1", True, "ok", None, None))
    assert plain.route is None and "attempts" not in plain.to_dict()  # the seed's shape


def test_a_slow_hedgeable_request_gets_a_second_copy_and_the_first_answer_wins() -> None:
    table = RequestTable()
    warmed(table)
    req = request()
    [reserve] = [a for a in table.submit(req) if isinstance(a, Reserve)]
    forward, arm = table.reserved(req, Reservation(hedgeable_worker("w1"), True, "ll: a"), NOW)
    assert isinstance(arm, ArmHedge) and arm.delay == pytest.approx(0.020)
    [again] = table.hedge_due("k1")
    assert isinstance(again, Reserve) and req.wanted().avoid == frozenset({"w1"})
    [second] = table.reserved(req, Reservation(worker("w2"), True, "ll: b"), NOW + 0.02)
    assert isinstance(second, Forward) and second.worker.worker_id == "w2"
    actions = table.replied("k1", "w2", True, "from w2", None, None, latency_ms=5.0)
    [cancel] = [a for a in actions if isinstance(a, CancelOnWorker)]
    assert cancel.placement.worker_id == "w1" and cancel.reason == "answered by another worker"
    response = answer_of(actions)
    assert response.processed_by == "w2" and response.route == {"attempts": 2, "hedged": True}
    assert req.routing == "ll: a | ll: b"
    assert table.replied("k1", "w1", True, "late", None, None) == []  # the loser: dropped


def test_a_hedged_request_whose_copy_is_lost_goes_on_with_the_other() -> None:
    table = RequestTable()
    req = hedge_due(table)
    table.reserved(req, Reservation(worker("w2"), True), NOW)
    assert table.lost("k1", "w1", "connection closed") == []  # no retry: w2 has it
    assert answer_of(table.replied("k1", "w2", True, "ok", None, None)).success


def test_no_hedge_without_opt_in_for_streams_or_named_workers_or_not_idempotent() -> None:
    for req, entry in [(request(), worker("w1")),  # nobody opted in
                       (request(stream=True), hedgeable_worker("w1")),
                       (request(target="w1"), hedgeable_worker("w1")),
                       (request(), WorkerEntry("w1", "w1", "worker.w1", frozenset({"echo"}),
                                               no_retry=frozenset({"echo"}),
                                               hedge=frozenset({"echo"})))]:
        table = RequestTable()
        warmed(table)
        table.submit(req)
        actions = table.reserved(req, Reservation(entry, True), NOW)
        assert not any(isinstance(a, ArmHedge) for a in actions), req
    asked = request()
    asked.hedge = True  # the requester opted in for this one
    table = RequestTable()
    warmed(table)
    table.submit(asked)
    assert any(isinstance(a, ArmHedge)
               for a in table.reserved(asked, Reservation(worker("w1"), True), NOW))


def test_the_hedge_budget_caps_hedges_to_a_share_of_traffic() -> None:
    table = RequestTable()
    warmed(table)
    hedges = 0
    for n in range(300):
        req = request(f"k{n}")
        table.submit(req)
        for action in table.reserved(req, Reservation(hedgeable_worker("w1"), True), NOW):
            if isinstance(action, ArmHedge) and table.hedge_due(req.key):
                hedges += 1
    assert hedges <= 0.1 * 300 + 10


def test_no_worker_matching_the_selector_is_said_in_the_error() -> None:
    table = RequestTable()
    req = request()
    req.select = (("gpu", "a100"),)
    table.submit(req)
    [answer] = table.reserved(req, Reservation(None, False, "least_loaded: 0 of 2; 2 selector",
                                               "gpu=a100"), NOW)
    assert answer.response.error == "No available workers: no worker offering 'echo' has " \
                                    "gpu=a100"
    assert answer.response.code == ErrorCode.NO_WORKERS


def test_a_hedge_copy_never_goes_to_a_worker_that_says_the_command_must_not_run_twice(
        ) -> None:
    table = RequestTable()
    req = hedge_due(table)
    careful = worker("w2", no_retry=frozenset({"echo"}))
    assert table.reserved(req, Reservation(careful, True), NOW) == [GiveBack("w2")]
    assert not req.hedged and [p.worker_id for p in req.placements] == ["w1"]


def test_a_failover_inside_a_hedge_is_told_too() -> None:
    table = RequestTable()
    req = hedge_due(table)
    table.reserved(req, Reservation(worker("w2"), True), NOW)
    table.lost("k1", "w1", "connection closed")
    [reserve] = table.lost("k1", "w2", "connection closed")
    assert req.wanted().avoid == frozenset()  # they may come back (a new connection)
    table.reserved(req, Reservation(worker("w3"), True), NOW)
    response = answer_of(table.replied("k1", "w3", True, "ok", None, None))
    assert response.route == {"attempts": 3, "failover_from": ["w1", "w2"], "hedged": True}


def test_a_request_for_a_named_worker_that_was_lost_is_answered_at_once() -> None:
    table = RequestTable()
    req = request(target="w1")
    placed(table, req, worker("w1"))
    [answer] = table.lost("k1", "w1", "no sign of life for 1s", ErrorCode.LEASE_EXPIRED)
    assert answer.response.code == "lease_expired"
    assert answer.response.error == "Lease expired (no sign of life for 1s)"


def test_a_pass_over_the_queue_puts_back_what_still_waits_in_its_order() -> None:
    table = RequestTable()
    a1, a2, b1 = request("a1"), request("a2"), request("b1", command="resize")
    for req in (a1, a2, b1):
        table.submit(req)
        table.reserved(req, Reservation(None, True), NOW)  # all busy: they wait
    late = request("late")
    table.submit(late)  # comes while others wait: queued behind them
    assert [r.key for r in table.take_waiting()] == ["a1", "a2", "b1", "late"]
    assert table.reserved(a1, Reservation(None, True), NOW) == []  # busy still
    table.untried([a2, late])  # like a1: not tried in this pass
    [forward] = table.reserved(b1, Reservation(worker("w9"), True), NOW)
    assert isinstance(forward, Forward)
    table.end_pass()
    assert [r.key for r in table.take_waiting()] == ["a1", "a2", "late"]


def test_a_request_whose_lease_ran_out_is_retried_on_another_worker_only() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker("w1"))
    [reserve] = table.lost("k1", "w1", "no sign of life for 1s", ErrorCode.LEASE_EXPIRED)
    assert req.wanted().avoid == frozenset({"w1"})
    [answer] = table.reserved(req, Reservation(None, False, "least_loaded: 0 of 1; 1 avoided"),
                              NOW)
    assert answer.response.code == "lease_expired"
    assert "no other worker offers 'echo'" in answer.response.error


def test_after_a_pass_the_owner_whose_turn_was_next_stays_next() -> None:
    table = RequestTable()
    bulk = [request(f"b{i}", owner="bulk") for i in range(5)]
    for req in bulk:
        table.submit(req)
        table.reserved(req, Reservation(None, True), NOW)
    small = request("s0", owner="small")
    table.submit(small)
    batch = table.take_waiting()
    assert [r.key for r in batch] == ["b0", "s0", "b1", "b2", "b3", "b4"]
    table.reserved(batch[0], Reservation(worker(), True), NOW)  # one slot: b0 runs
    table.reserved(batch[1], Reservation(None, True), NOW)  # full again
    table.untried(batch[2:])
    table.end_pass()
    assert [r.key for r in table.take_waiting()][:2] == ["s0", "b1"]
