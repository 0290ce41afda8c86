"""The request table without sockets: every transition, driven with a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from dispatch.core.requests import (Answer, Arm, Drop, Forward, GiveBack, Request,
                                    RequestTable, Reserve, State)
from dispatch.registry import Reservation, WorkerEntry
from workers.protocol import ApiResponse, ErrorCode

NOW = 1000.0


async def nobody(response: ApiResponse) -> None:  # never awaited by the table itself
    raise AssertionError("the table must not answer by itself")


def request(key: str = "k1", command: str = "echo", *, target: str | None = None,
            timeout: float = 30.0) -> Request:
    return Request(key, command, {"message": "hi"}, nobody, f"rid-{key}", "127.0.0.1:1",
                   NOW + timeout, 0.0, target=target)


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


def test_a_failure_answer_keeps_the_workers_code_or_says_worker_error() -> None:
    table = RequestTable()
    placed(table, request("a"), worker())
    assert answer_of(table.replied("a", "w1", False, None, "nope", "command_error")).code == \
        "command_error"
    placed(table, request("b"), worker())
    assert answer_of(table.replied("b", "w1", False, None, "nope", None)).code == \
        "worker_error"
    placed(table, request("c"), worker())
    assert answer_of(table.replied("c", "w1", False, None, "nope", "made-up")).code == \
        "worker_error"


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
        assert table.reserved(first, Reservation(None, True), NOW) == []
        assert first.state is State.WAITING and list(table.waiting) == [first]
        response = answer_of(table.reserved(second, Reservation(None, True), NOW))
        assert response.code == "all_busy" and table.stats["queue_full"] == 1
    assert table.take_waiting() == [first] and first.state is State.RESERVING
    assert not table.waiting


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
    responses = [a.response for a in table.reservation_failed(reqs, "Redis unavailable")]
    assert [r.code for r in responses] == ["broker_unavailable"] * 2
    assert responses[0].error == "Broker unavailable: Redis unavailable"


def test_abandoned_requests_are_forgotten_and_their_answers_dropped() -> None:
    table = RequestTable()
    req = request()
    placed(table, req, worker())
    assert table.abandon(["k1", "never-was"]) == [Drop(req)]
    assert table.replied("k1", "w1", True, "late", None, None) == []


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
