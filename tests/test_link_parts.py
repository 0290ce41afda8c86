"""The sans-I/O parts of a worker link, on a fake clock: its pulse and what it holds."""

from __future__ import annotations

from dispatch.balancing import Health, WorkerState, unavailable, worker_state
from dispatch.core.held import Assignment, Due, Held
from dispatch.core.pulse import Pulse, Verdict
from dispatch.registry import WorkerEntry

INTERVAL = 5.0


def look(pulse: Pulse, now: float, *, registered: bool = True, quiet: bool = False) -> Verdict:
    return pulse.look(now, registered=registered, register_timeout=10.0, interval=INTERVAL,
                      misses=3, quiet=quiet)


def test_a_connection_that_never_registers_is_closed_after_the_register_timeout() -> None:
    pulse = Pulse.started(0.0, INTERVAL)
    assert look(pulse, 9.0, registered=False) is Verdict.WELL
    assert look(pulse, 10.5, registered=False) is Verdict.UNREGISTERED


def test_a_seed_worker_is_pinged_every_other_interval_and_dropped_when_silent() -> None:
    pulse = Pulse.started(0.0, INTERVAL)
    assert look(pulse, 4.0) is Verdict.WELL
    assert look(pulse, 5.0) is Verdict.PING and pulse.ping_out == 5.0
    assert look(pulse, 6.0) is Verdict.WELL  # the next is two intervals on
    pulse.last_frame, pulse.ping_out = 7.0, None  # it answered
    assert look(pulse, 15.0) is Verdict.PING
    assert look(pulse, 22.5) is Verdict.SILENT  # 15.5 s: more than 3 intervals


def test_a_worker_that_talks_but_never_answers_a_ping_is_deaf() -> None:
    pulse = Pulse.started(0.0, INTERVAL)
    assert look(pulse, 5.0) is Verdict.PING
    for now in (10.0, 15.0, 20.0):
        pulse.last_frame = now  # it keeps sending, never the ack
        look(pulse, now)
    assert pulse.ping_out == 5.0 and look(pulse, 20.5) is Verdict.DEAF


def test_a_quiet_worker_is_pinged_only_once_it_missed_a_beat() -> None:
    pulse = Pulse.started(0.0, INTERVAL)
    for now in (5.0, 10.0, 15.0):
        pulse.last_frame = now  # it beats every interval
        assert look(pulse, now + 0.1, quiet=True) is Verdict.WELL
        assert pulse.quiet_enough(now + 0.1, INTERVAL, quiet=True)
    assert look(pulse, 15.0 + 1.5 * INTERVAL, quiet=True) is Verdict.PING


def held_one(key: str, **fields: object) -> Held:
    held = Held()
    held.add(key, Assignment("inbox", started=0.0, deadline=30.0, size=100, **fields))
    return held


def test_what_a_worker_holds_is_freed_at_its_deadline_or_after_an_unconfirmed_cancel() -> None:
    held = held_one("k")
    assert held.chars == 100 and not list(held.due(29.0, grace=5.0))
    [(key, _, due)] = held.due(31.0, grace=5.0)
    assert (key, due, len(held), held.chars) == ("k", Due.TIMED_OUT, 0, 0)
    held = held_one("k", cancelled=10.0, verdict=Health.FAULT)
    assert not list(held.due(14.0, grace=5.0))
    [(_, assignment, due)] = held.due(16.0, grace=5.0)
    assert due is Due.UNCONFIRMED and assignment.verdict is Health.FAULT and not held


def test_a_leased_job_without_life_is_hung_but_stays_held_until_its_worker_confirms() -> None:
    held = held_one("k", lease=4.0, last_life=0.0)
    assert not list(held.due(3.0, grace=5.0))
    [(_, _, due)] = held.due(4.5, grace=5.0)
    assert due is Due.HUNG and "k" in held


def test_worker_states_are_one_set_of_names() -> None:
    entry = WorkerEntry(worker_id="w", name="w", connection="c", commands=frozenset({"x"}),
                        max_concurrency=1)
    assert worker_state(entry, 0.0) is WorkerState.ONLINE and unavailable(entry, 0.0) is None
    entry.in_flight = 1
    assert unavailable(entry, 0.0) is WorkerState.FULL
    entry.probing = True
    assert worker_state(entry, 0.0) is WorkerState.PROBING
    assert unavailable(entry, 0.0) is WorkerState.PROBING  # on trial: one at a time
    entry.ejected_until = 10.0
    assert unavailable(entry, 5.0) is WorkerState.EJECTED and entry.state == "probing"
    entry.draining = True
    assert worker_state(entry, 5.0) is WorkerState.DRAINING == "draining"
