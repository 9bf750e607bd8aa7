"""`qtrap-sim seed`: a routing seed from a calibrated profile, read by the proxy's seed reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qtrap_proxy.config import load_config
from qtrap_proxy.cost import CostPolicy
from qtrap_proxy.costseed import read_seed
from qtrap_proxy.routing import Router
from qtrap_proxy.upstream import Backend
from qtrap_sim.cli import main as sim_main
from qtrap_sim.perf import CalibratedPerf, kernel_of
from qtrap_sim.seed import profile_seed, steady_state


def test_steady_state_is_the_profiles_step_above_idle() -> None:
    perf = CalibratedPerf("h200", "qwen3-8b", "bf16")
    one = steady_state(perf, 1, 300, 128)
    step = perf.step(1 - 1 // 128 + 0 or 1, 300)  # c=1: one decode row (plus 1/128 of an admission)
    assert one["tokens_per_s"] == pytest.approx(1 / step.time_s, rel=0.1)
    for c in (1, 8, 64):
        s = steady_state(perf, c, 300, 128)
        # power (idle included) = energy above idle per token x tokens/s + idle power
        assert s["j_per_token"] * s["tokens_per_s"] + perf.idle_power_w == pytest.approx(s["power_w"])
        assert s["j_per_token"] > 0 and s["power_w"] > perf.idle_power_w
    jpt = [steady_state(perf, c, 300, 128)["j_per_token"] for c in (1, 2, 4, 8, 16, 32, 64)]
    assert jpt == sorted(jpt, reverse=True)  # batching spreads the weights' traffic


def test_the_seed_is_a_report_the_proxy_reads(tmp_path: Path) -> None:
    out = tmp_path / "seed.json"
    assert (
        sim_main(
            [
                "seed",
                "--gpu",
                "h200",
                "--precisions",
                "bf16,int4",
                "--concurrency",
                "1,8,32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["simulated"] is True and doc["config"]["kernels"]["int4"] == kernel_of("h200", "int4")
    seed = read_seed(out)
    assert seed.model == "qwen3-8b" and seed.skipped == 0
    assert [(lv.precision, lv.concurrency) for lv in seed.levels] == [
        (p, c) for p in ("bf16", "int4") for c in (1, 8, 32)
    ]
    assert all(lv.tokens_per_s is not None and lv.tokens_per_s > 0 for lv in seed.levels)
    # the H200 profile (calibrated to real vLLM): W4A16 cheaper than BF16 per token at every level
    by = {(lv.precision, lv.concurrency): lv.j_per_token for lv in seed.levels}
    assert all(by[("int4", c)] < by[("bf16", c)] for c in (1, 8, 32))
    # a cost pool seeded with it routes a first request to INT4 before any meter interval
    cfg = load_config(
        data={
            "backends": [
                {"name": f"{p}-0", "pool": "qwen3-8b", "precision": p, "url": f"http://127.0.0.1:{9000 + i}",
                 "model": "Qwen/Qwen3-8B"}
                for i, p in enumerate(("bf16", "int4"))
            ],
            "pools": {"qwen3-8b": {"default_precision": "bf16", "routing": "cost", "cost": {"explore": 0}}},
        }
    )  # fmt: skip
    backends = [Backend(b) for b in cfg.backends]
    router = Router(cfg, backends)
    policy = CostPolicy(cfg, router.pools, {"qwen3-8b": seed}, random.Random(1))
    assert policy.decide("qwen3-8b").precision == "int4"


def test_profile_seed_defaults_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    doc = profile_seed("h200", "qwen3-8b", ["bf16"], [1, 4], 100, 64)
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    assert sim_main(["seed", "--gpu", "nope"]) == 2
    assert "no calibrated profile for GPU 'nope'" in capsys.readouterr().err
    assert sim_main(["seed", "--precisions", "fp3"]) == 2
    assert "no precision 'fp3'" in capsys.readouterr().err
    assert sim_main(["seed", "--model", "qwen9-1t"]) == 2
    assert "has no model 'qwen9-1t'" in capsys.readouterr().err
    assert sim_main(["seed", "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        sim_main(["seed", "--concurrency", "1,x"])
    assert e.value.code == 2
