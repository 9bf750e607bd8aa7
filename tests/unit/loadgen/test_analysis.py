"""B* interpolation and its confidence interval on constructed data with a known answer."""

from __future__ import annotations

import math
import random

import pytest

from loadgen.analysis import ChainObs, LevelObs, analyse, crossings

LEVELS = [1, 2, 4, 8, 16, 32, 64]


def test_crossing_of_a_power_law_is_exact() -> None:
    # ratio = (c / 6) ** 0.7 is linear in log-log, so the interpolation recovers B* = 6 exactly
    ratio = [(c / 6) ** 0.7 for c in LEVELS]
    [(b, direction)] = crossings(LEVELS, ratio)
    assert b == pytest.approx(6.0, rel=1e-12) and direction == "below"
    [(b, direction)] = crossings(LEVELS, [1 / r for r in ratio])
    assert b == pytest.approx(6.0, rel=1e-12) and direction == "above"


def test_no_crossing_touching_and_several() -> None:
    assert crossings(LEVELS, [0.5] * len(LEVELS)) == []
    assert crossings([1, 8, 64], [0.8, 1.0, 0.9]) == []  # touches 1 without changing side
    assert crossings([1, 8, 64], [0.8, 1.0, 1.3]) == [(8.0, "below")]
    found = crossings([1, 4, 16, 64], [0.5, 2.0, 0.5, 2.0])
    assert [d for _, d in found] == ["below", "above", "below"]
    assert crossings([1, 8], [0.5, math.nan]) == []


def _level(
    precision: str, c: int, j_per_token: float, rng: random.Random, chains: int = 60, noise: float = 0.1
) -> LevelObs:
    obs = LevelObs(precision, c, repeats=1)
    for _ in range(chains):
        hops = rng.randint(2, 5)
        tokens = 40 * hops
        energy = j_per_token * tokens * math.exp(rng.gauss(0, noise))
        ch = ChainObs(0, hops, True, rng.random() < 0.8, True, energy, tokens, 1.0)
        obs.chains.append(ch)
        obs.window_chains.append(ch)
        obs.window_requests += hops
    obs.window_s, obs.window_tokens_prorata = 10.0, sum(c.tokens for c in obs.chains)
    return obs


def _fleet(seed: int, b_star: float = 6.0) -> list[LevelObs]:
    rng = random.Random(seed)
    out = []
    for c in LEVELS:
        base = 2.0 / c**0.8
        out.append(_level("bf16", c, base, rng))
        out.append(_level("int4", c, base * (c / b_star) ** 0.7, rng))
    return out


def test_b_star_point_and_interval_on_constructed_data() -> None:
    a = analyse(_fleet(1), bootstrap=400, seed=3)
    assert a.baseline == "bf16"
    cx = next(x for x in a.crossovers if x["metric"] == "j_per_token")
    assert cx["b_star"] == pytest.approx(6.0, rel=0.25)
    assert cx["direction"] == "int4 cheaper below B*"
    lo, hi = cx["ci"]
    assert lo < 6.0 < hi and hi / lo < 3
    assert cx["ci_coverage"] > 0.95
    # J per correct answer divides by the pooled accuracy of each precision
    lv = next(x for x in a.levels if x["precision"] == "int4" and x["concurrency"] == 8)
    assert lv["j_per_correct"] == pytest.approx(lv["j_per_chain"] / a.accuracy["int4"]["accuracy"])


def test_interval_covers_the_true_b_star_most_of_the_time() -> None:
    hits = 0
    runs = 30
    for seed in range(runs):
        cx = next(
            x
            for x in analyse(_fleet(100 + seed), bootstrap=200, seed=seed).crossovers
            if x["metric"] == "j_per_token"
        )
        if cx["ci"] and cx["ci"][0] <= 6.0 <= cx["ci"][1]:
            hits += 1
    # nominal 95%; 30 runs at a true 95% give >= 24 hits with probability > 0.99
    assert hits >= 24, hits


def test_no_crossover_is_said_plainly_and_indices() -> None:
    rng = random.Random(5)
    obs = []
    for c in (1, 8, 64):
        obs.append(_level("fp16", c, 1.0, rng, noise=0.01))
        obs.append(_level("int8", c, 1.5, rng, noise=0.01))
    a = analyse(obs, bootstrap=100)
    cx = next(x for x in a.crossovers if x["metric"] == "j_per_token")
    assert cx["b_star"] is None and cx["ci"] is None
    assert cx["direction"] == "int8 dearer at every swept concurrency"
    assert cx["note"] == "no crossover between concurrency 1 and 64"
    idx = next(i for i in a.indices if i["concurrency"] == 8)
    # linear-in-bits predicts int8 = 0.5 x fp16; measured 1.5 x: casting overhead ratio 3
    assert idx["casting_overhead_ratio"] == pytest.approx(3.0, rel=0.02)
    assert idx["sustainability_index"] == pytest.approx(
        1 / 1.5 * a.accuracy["int8"]["accuracy"] / a.accuracy["fp16"]["accuracy"], rel=0.05
    )
    w = idx["weights"]
    assert idx["composite_index"] == pytest.approx(
        w["trust"] * idx["trust_index"]
        + w["sustainability"] * idx["sustainability_index"]
        + w["economy"] * idx["economy_index"]
    )


def test_unknown_energy_stays_null() -> None:
    obs = [LevelObs("bf16", 1, repeats=1), LevelObs("int4", 1, repeats=1)]
    obs[0].energy_unknown_reason = "meter: null (energy unknown)"
    a = analyse(obs, bootstrap=50)
    assert a.levels[0]["energy_j"] is None and a.levels[0]["j_per_token"] is None
    assert a.levels[0]["energy_null_reason"] == "meter: null (energy unknown)"
    assert a.levels[1]["energy_null_reason"]
    assert all(x["b_star"] is None for x in a.crossovers)


def test_no_score_leaves_accuracy_null_and_b_star_on_j_per_token() -> None:
    """--no-score (random weights): accuracy and J per correct answer are null with the reason, never 0;
    B* is located on J/token alone; casting overhead and economy, which need no accuracy, are kept."""
    reason = "random weights: answers mean nothing"
    a = analyse(_fleet(2), bootstrap=200, seed=1, accuracy_null_reason=reason)
    assert a.accuracy_null_reason == reason
    for p in ("bf16", "int4"):
        acc = a.accuracy[p]
        assert acc["chains"] == 7 * 60
        assert acc["accuracy"] is None and acc["correct"] is None and acc["ci"] is None
        assert acc["by_hops"] == {} and acc["null_reason"] == reason
    for lv in a.levels:
        assert lv["accuracy"] is None and lv["accuracy_flexible"] is None and lv["accuracy_by_hops"] == {}
        assert lv["j_per_correct"] is None and lv["ci"]["j_per_correct"] is None
        assert lv["accuracy_null_reason"] == reason
        assert lv["chains_scored"] == 0 and lv["chains_ok"] == 60
        assert lv["j_per_token"] > 0 and lv["j_per_chain"] > 0 and lv["ci"]["j_per_token"]
    [cx] = a.crossovers
    assert cx["metric"] == "j_per_token" and cx["b_star"] == pytest.approx(6.0, rel=0.25) and cx["ci"]
    for idx in a.indices:
        assert idx["trust_index"] is None and idx["sustainability_index"] is None
        assert idx["composite_index"] is None
        assert idx["casting_overhead_ratio"] > 0 and idx["economy_index"] is not None
    # scored, the same data give both metrics and every index
    b = analyse(_fleet(2), bootstrap=50, seed=1)
    assert b.accuracy_null_reason is None and {x["metric"] for x in b.crossovers} == {
        "j_per_correct",
        "j_per_token",
    }
    assert all(lv["accuracy_null_reason"] is None and lv["accuracy"] is not None for lv in b.levels)


def test_a_levels_co2e_and_cost_sum_the_records_known_and_count_the_others() -> None:
    from loadgen.analysis import LevelObs, _footprint, _footprint_fields

    obs = LevelObs("bf16", 1)
    recs = [
        {"co2e_g": 1.5, "cost": 0.25, "cost_currency": "EUR"},
        {"co2e_g": 0.5, "cost": 0.75, "cost_currency": "EUR"},
        {"co2e_g": None, "co2e_null_reason": "stale", "cost": None, "cost_null_reason": "no price"},
    ]
    for rec in recs:
        obs.window_requests += 1
        _footprint(obs, rec)
    f = _footprint_fields(obs, known=True)
    assert (f["co2e_g"], f["co2e_unknown_requests"], f["co2e_null_reason"]) == (2.0, 1, None)
    assert (f["cost"], f["cost_currency"], f["cost_unknown_requests"]) == (1.0, "EUR", 1)
    none = LevelObs("bf16", 1)
    none.window_requests = 1
    _footprint(none, {"co2e_null_reason": "no carbon intensity configured", "cost_null_reason": "no price"})
    f = _footprint_fields(none, known=True)
    assert f["co2e_g"] is None and f["co2e_null_reason"] == "no carbon intensity configured"
    assert f["cost"] is None and f["cost_null_reason"] == "no price"
    _footprint(obs, {"co2e_g": 1.0, "cost": 1.0, "cost_currency": "USD"})
    obs.window_requests += 1
    f = _footprint_fields(obs, known=True)
    assert (
        f["cost"] is None
        and f["cost_null_reason"] == "costs in more than one currency"
        and f["co2e_g"] == 3.0
    )
