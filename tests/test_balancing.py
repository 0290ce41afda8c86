"""Choosing a worker, as pure functions: strategies, decay, ejection, selectors,
affinity, canaries, the explanation, and the hedge budget."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from dispatch.core import hedging
from dispatch.balancing import (LATENCY_DECAY_SECONDS, Health, RING_SUCCESSORS, STRATEGIES,
                                     UNMEASURED_LATENCY_MS, Ring, by_affinity,
                                     Wanted, choose, decayed, ejection_due, ejection_seconds,
                                     get_strategy, least_loaded, load_score, parse_canaries,
                                     peak_ewma)
from dispatch.core.hedging import HedgePolicy

NOW = 1_000_000.0


@dataclass
class W:
    worker_id: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrency: int = 16
    draining: bool = False
    latency_ms: float = 10.0
    latency_at: float = NOW
    error_rate: float = 0.0
    ejected_until: float = 0.0
    probing: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    version: str = ""


def pick_many(name: str, workers: list[W], n: int = 4000) -> Counter[str]:
    strategy, rng = get_strategy(name), random.Random(7)
    return Counter(strategy(workers, i, rng, NOW).worker_id for i in range(n))


def chosen(workers: list[W], wanted: Wanted, rng: random.Random | None = None,
           **options: object) -> str | None:
    choice = choose(workers, wanted, "least_loaded", 0, rng or random.Random(1), NOW,
                    **options)  # type: ignore[arg-type]
    return choice.worker.worker_id if choice.worker is not None else None


# ---------------------------------------------------------------------------- strategies


def test_least_loaded_prefers_fewer_in_flight_of_the_two_it_draws() -> None:
    workers = [W("a", in_flight=5), W("b", in_flight=1), W("c", in_flight=3)]
    counts = pick_many("least_loaded", workers, 3000)
    # Power of two choices: with equal latencies, fewer in flight always wins its draw.
    assert "a" not in counts and counts["b"] > 1.5 * counts["c"]


def test_load_score_weighs_in_flight_latency_weight_and_health() -> None:
    assert load_score(W("slow", latency_ms=100), NOW) > load_score(W("fast"), NOW)
    assert load_score(W("light", weight=1), NOW) > load_score(W("heavy", weight=4), NOW)
    assert load_score(W("failing", error_rate=0.5), NOW) > load_score(W("healthy"), NOW)
    assert load_score(W("busy", in_flight=3), NOW) == 4 * load_score(W("idle"), NOW)


def test_of_two_near_equals_the_one_that_answered_least_recently_wins() -> None:
    recent, earlier = W("recent", latency_ms=10.0), W("earlier", latency_ms=14.0,
                                                     latency_at=NOW - 0.5)
    assert all(least_loaded([recent, earlier], 0, random.Random(n), NOW) is earlier
               for n in range(50))


def test_least_loaded_spreads_ties() -> None:
    counts = pick_many("least_loaded", [W("a"), W("b"), W("c")], 3000)
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 800


def test_round_robin_cycles_in_stable_order_whatever_the_input_order() -> None:
    workers = [W("b"), W("c"), W("a")]
    strategy, rng = get_strategy("round_robin"), random.Random()
    picks = [strategy(list(reversed(workers)) if i % 2 else workers, i, rng, NOW).worker_id
             for i in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_weighted_random_follows_weights() -> None:
    counts = pick_many("weighted_random", [W("a", weight=1), W("b", weight=3)])
    assert 2.4 < counts["b"] / counts["a"] < 3.6


def test_random_uses_everyone() -> None:
    counts = pick_many("random", [W("a"), W("b")], 1000)
    assert 350 < counts["a"] < 650


def test_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="least_loaded, round_robin, random, weighted_random"):
        get_strategy("fastest")
    assert set(STRATEGIES) == {"least_loaded", "round_robin", "random", "weighted_random"}


# ---------------------------------------------------------------------------- latency


def test_a_latency_estimate_decays_toward_fast_while_unused() -> None:
    """The bug this replaces: a worker measured slow once was never tried again."""
    assert decayed(50.0, NOW, NOW) == 50.0
    later = decayed(50.0, NOW, NOW + LATENCY_DECAY_SECONDS)
    assert later == pytest.approx(UNMEASURED_LATENCY_MS + 49.0 / 2.718281828, rel=1e-3)
    assert decayed(50.0, NOW, NOW + 10 * LATENCY_DECAY_SECONDS) < 1.01
    assert decayed(0.0, 0.0, NOW) == UNMEASURED_LATENCY_MS  # never measured: "fast"


def test_peak_ewma_takes_a_peak_at_once_up_to_a_step_and_a_dip_gently() -> None:
    assert peak_ewma(10.0, NOW, 12.0, NOW) == 12.0
    assert peak_ewma(10.0, NOW, 80.0, NOW) == 15.0  # one hiccup: at most PEAK_STEP
    assert peak_ewma(0.0, 0.0, 80.0, NOW) == 80.0  # the first sample is taken whole
    dipped = peak_ewma(80.0, NOW, 10.0, NOW)
    assert 50 < dipped < 80


def test_an_idle_slow_worker_wins_again_once_its_figure_has_faded() -> None:
    fast, slow = W("fast", latency_ms=5.0), W("slow", latency_ms=40.0, latency_at=NOW - 60)
    assert pick_many("least_loaded", [fast, slow], 1000)["slow"] > 600
    slow.latency_at = NOW
    assert pick_many("least_loaded", [fast, slow], 1000)["slow"] < 150


# ---------------------------------------------------------------------------- eligibility


def test_draining_ejected_full_and_busy_probing_workers_are_excluded_and_counted() -> None:
    workers = [W("drain", draining=True), W("out", ejected_until=NOW + 5),
               W("full", in_flight=16), W("probe", probing=True, in_flight=1), W("ok")]
    choice = choose(workers, Wanted("c"), "least_loaded", 0, random.Random(), NOW)
    assert choice.worker.worker_id == "ok"
    assert choice.why == "least_loaded: 1 of 5; 1 draining 1 ejected 1 full 1 probing; ok 10"
    idle_probe = W("probe", probing=True, ejected_until=NOW - 1, latency_ms=900.0,
                   error_rate=0.7)
    # Its time out is up: the next request is its trial, however bad its old figures.
    assert chosen([W("fast", latency_ms=1.0), idle_probe], Wanted("c")) == "probe"


def test_all_matching_workers_busy_means_wait_not_fail() -> None:
    choice = choose([W("a", in_flight=16)], Wanted("c"), "least_loaded", 0, random.Random(),
                    NOW)
    assert choice.worker is None and choice.capable
    empty = choose([], Wanted("c"), "least_loaded", 0, random.Random(), NOW)
    assert empty.worker is None and not empty.capable and not empty.unmatched


def test_ejection_after_consecutive_failures_and_growing_time() -> None:
    fault = Health.FAULT
    assert not ejection_due(4, False, fault, 5, 0.0, NOW)
    assert ejection_due(5, False, fault, 5, 0.0, NOW)
    assert not ejection_due(9, False, Health.OK, 5, 0.0, NOW)  # a success is never a reason
    assert not ejection_due(9, False, Health.UNKNOWN, 5, 0.0, NOW)  # a timeout neither
    assert not ejection_due(9, True, Health.ERROR, 5, 0.0, NOW)  # a handler's error neither
    assert ejection_due(1, True, fault, 5, 0.0, NOW)  # a failed probe: out again at once
    assert not ejection_due(9, True, fault, 5, NOW + 1, NOW)  # out already: not stretched
    assert [ejection_seconds(n, 30, 300) for n in (1, 2, 3, 4, 5)] == [30, 60, 120, 240, 300]


# ---------------------------------------------------------------------------- selectors


def test_a_selector_keeps_only_matching_workers_and_names_itself_when_none_match() -> None:
    workers = [W("cpu", labels={"gpu": "none"}), W("a100", labels={"gpu": "a100",
                                                                  "region": "eu"})]
    assert chosen(workers, Wanted("c", select=(("gpu", "a100"),))) == "a100"
    assert chosen(workers, Wanted("c", select=(("gpu", "a100"), ("region", "eu")))) == "a100"
    miss = choose(workers, Wanted("c", select=(("gpu", "h100"),)), "least_loaded", 0,
                  random.Random(), NOW)
    assert miss.worker is None and not miss.capable and miss.unmatched == "gpu=h100"
    assert "2 selector" in miss.why


def test_avoid_keeps_a_hedge_off_its_first_worker() -> None:
    assert chosen([W("a"), W("b")], Wanted("c", avoid=frozenset({"a"}))) == "b"
    only = choose([W("a")], Wanted("c", avoid=frozenset({"a"})), "least_loaded", 0,
                  random.Random(), NOW)
    assert only.worker is None and not only.capable  # nobody else: no use waiting


# ---------------------------------------------------------------------------- affinity


def home(workers: list[W], key: str) -> str | None:
    return chosen(Ring(workers).successors(key), Wanted("c", affinity=key))


def test_affinity_sends_one_key_to_one_worker_and_moves_only_a_leaving_workers_keys() -> None:
    workers = [W(f"w{i}") for i in range(5)]
    keys = [f"user-{n}" for n in range(500)]
    before = {k: home(workers, k) for k in keys}
    assert all(home(list(reversed(workers)), k) == before[k]
               for k in keys[:50])  # order does not matter, nor load
    assert min(Counter(before.values()).values()) > 50  # and keys spread over all
    after = {k: home(workers[1:], k) for k in keys}
    moved = {k for k in keys if after[k] != before[k]}
    assert moved == {k for k in keys if before[k] == "w0"}


def test_affinity_skips_its_worker_while_that_one_is_full() -> None:
    workers = [W(f"w{i}") for i in range(3)]
    first = home(workers, "k")
    for w in workers:
        w.in_flight = 16 if w.worker_id == first else 0
    assert home(workers, "k") not in (first, None)


def test_a_ring_lookup_looks_at_a_few_successors_however_large_the_fleet() -> None:
    ring = Ring([W(f"w{i}") for i in range(5000)])
    assert len(ring.successors("user-1")) == RING_SUCCESSORS
    assert len({w.worker_id for w in ring.successors("user-1")}) == RING_SUCCESSORS


def test_with_a_selector_affinity_orders_the_matching_workers_by_rendezvous() -> None:
    workers = [W(f"w{i}", labels={"gpu": "a100"}) for i in range(6)]
    keys = [f"k{n}" for n in range(200)]
    picks = {k: by_affinity(workers, k)[0].worker_id for k in keys}
    assert picks == {k: by_affinity(list(reversed(workers)), k)[0].worker_id for k in keys}
    assert len(set(picks.values())) == 6


# ---------------------------------------------------------------------------- canary


def test_a_canary_rule_sends_its_share_to_that_version() -> None:
    rules = parse_canaries("resize=2.1:10, train=3:50")
    assert rules == {"resize": ("2.1", 0.1), "train": ("3", 0.5)}
    workers = [W("old1", version="2.0"), W("old2", version="2.0"), W("new", version="2.1")]
    rng = random.Random(3)
    counts = Counter(chosen(workers, Wanted("resize"), rng, canaries=rules)
                     for _ in range(4000))
    assert 0.07 < counts["new"] / 4000 < 0.13
    other = Counter(chosen(workers, Wanted("echo"), rng, canaries=rules) for _ in range(3000))
    assert other["new"] > 700  # no rule for it: everyone alike
    alone = [W("new", version="2.1")]
    assert chosen(alone, Wanted("resize"), rng, canaries=rules) == "new"  # one side empty


@pytest.mark.parametrize("bad", ["resize", "resize=2.1", "resize=2.1:x", "=2.1:5",
                                 "resize=2.1:150"])
def test_a_bad_canary_rule_says_what_the_form_is(bad: str) -> None:
    with pytest.raises(ValueError, match="command=version:percent"):
        parse_canaries(bad)


# ---------------------------------------------------------------------------- explanation


def test_the_explanation_gives_candidates_exclusions_and_winner_against_runner_up() -> None:
    workers = [W("a", latency_ms=10), W("b", latency_ms=20, in_flight=1),
               W("c", draining=True)]
    choice = choose(workers, Wanted("c"), "least_loaded", 0, random.Random(1), NOW)
    assert choice.why == "least_loaded: 2 of 3; 1 draining; a 10 vs 40"
    sampled = choose(workers[:2], Wanted("c"), "least_loaded", 0, random.Random(1), NOW,
                     of=5000)
    assert sampled.why.startswith("least_loaded: 2 of 2 (sampled of 5000); a 10 vs 40")
    assert choose(workers, Wanted("c", affinity="k"), "least_loaded", 0, random.Random(),
                  NOW).why.startswith("affinity: 2 of 3")  # (in the order it was given)


# ---------------------------------------------------------------------------- hedging


def test_no_hedge_before_enough_samples_then_after_the_p95() -> None:
    policy = HedgePolicy()
    for _ in range(hedging.MIN_SAMPLES - 1):
        policy.record("c", 10.0)
    assert policy.delay("c", 0.1) is None
    policy.record("c", 10.0)
    assert policy.delay("c", 0.1) == pytest.approx(0.010)
    for _ in range(hedging.RECOMPUTE_EVERY):  # slower lately: the delay follows
        policy.record("c", 100.0)
    assert policy.delay("c", 0.1) == pytest.approx(0.100)
    assert policy.delay("other", 0.1) is None


def test_the_hedge_budget_is_a_share_of_hedgeable_requests_plus_a_burst() -> None:
    policy = HedgePolicy()
    for _ in range(hedging.MIN_SAMPLES):
        policy.record("c", 5.0)
    hedges = 0
    for _ in range(1000):  # every request slow: each would like a hedge
        if policy.delay("c", 0.1) is not None and policy.spend():
            hedges += 1
    assert hedges <= 0.1 * 1000 + hedging.BURST
    assert hedges >= 0.1 * 1000 - 1


def test_a_ring_kept_up_to_date_in_place_equals_one_built_afresh() -> None:
    workers = [W(f"w{i}") for i in range(30)]
    ring = Ring(workers[:20])
    for w in workers[20:]:
        ring.add(w)
    for w in workers[:5]:
        ring.remove(w)
    fresh = Ring(workers[5:])
    assert all([w.worker_id for w in ring.successors(f"k{n}")] ==
               [w.worker_id for w in fresh.successors(f"k{n}")] for n in range(200))
