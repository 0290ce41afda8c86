"""Load-balancing strategies, as pure functions."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from dispatch.core.balancing import STRATEGIES, get_strategy, least_loaded, load_score


@dataclass
class W:
    worker_id: str
    weight: float = 1.0
    in_flight: int = 0
    max_concurrency: int = 16
    latency_ms: float = 10.0
    error_rate: float = 0.0


def pick_many(name: str, workers: list[W], n: int = 4000) -> Counter[str]:
    strategy, rng = get_strategy(name), random.Random(7)
    return Counter(strategy(workers, i, rng).worker_id for i in range(n))


def test_least_loaded_prefers_fewer_in_flight() -> None:
    workers = [W("a", in_flight=5), W("b", in_flight=1), W("c", in_flight=3)]
    assert least_loaded(workers, 0, random.Random()).worker_id == "b"


def test_least_loaded_weighs_latency_weight_and_health() -> None:
    assert load_score(W("slow", latency_ms=100)) > load_score(W("fast", latency_ms=10))
    assert load_score(W("light", weight=1)) > load_score(W("heavy", weight=4))
    assert load_score(W("failing", error_rate=0.5)) > load_score(W("healthy"))


def test_least_loaded_spreads_ties() -> None:
    counts = pick_many("least_loaded", [W("a"), W("b"), W("c")], 3000)
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 800


def test_round_robin_cycles_in_stable_order_whatever_the_input_order() -> None:
    workers = [W("b"), W("c"), W("a")]
    strategy, rng = get_strategy("round_robin"), random.Random()
    picks = [strategy(list(reversed(workers)) if i % 2 else workers, i, rng).worker_id
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
