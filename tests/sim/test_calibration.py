"""local-cpu calibration: the fit, the file format, the shipped file."""

from __future__ import annotations

import json
import random

import pytest

from splitserve.sim import calibration
from splitserve.sim.calibration import FEATURES, Calibration, fit, load_calibration
from splitserve.sim.models import get_model


def synthetic_samples(coef, n=60, noise=0.01, seed=0):
    rng = random.Random(seed)
    cal = Calibration(model="smollm2-135m", coef=coef)
    out = []
    for _ in range(n):
        B = rng.randint(1, 64)
        T = B if rng.random() < 0.6 else rng.randint(16, 512)
        ctx = rng.randint(1, 2048)
        A, K = T * ctx, B * ctx
        out.append({"T": T, "S": B, "A": A, "K": K, "B": B,
                    "seconds": cal.step_time(T, B, A, K, B) * (1 + rng.uniform(-noise, noise))})
    return out


def test_fit_recovers_known_coefficients_and_shrugs_off_contended_steps():
    truth = {"c0": 0.012, "c_tok": 4e-4, "c_seq": 5e-5, "c_pair": 1e-9, "c_kv": 3e-6, "c_samp": 1e-4,
             "c_tok_big": 1e-4, "c_kv_big": 2e-5, "kv_knee": 16384}
    samples = []
    for i, s in enumerate(synthetic_samples(truth)):
        for k in range(3):  # three repeats of each shape, tagged as calibrate() tags them
            samples.append({**s, "tag": f"shape {i}", "seconds": s["seconds"] * (3 if (i, k) == (3, 1) else 1)})
    coef, quality = fit(samples)
    assert quality["shapes"] == 60
    assert quality["mean_abs_rel_error"] < 0.02
    assert coef["kv_knee"] == 16384
    for k in ("c0", "c_tok", "c_kv"):
        assert coef[k] == pytest.approx(truth[k], rel=0.15)
    assert all(v >= 0 for v in coef.values())


def test_fit_finds_the_weight_bound_floor_of_small_steps(monkeypatch):
    """Steps of up to tok_knee tokens cost about the same (the weights are read once whatever the
    batch); the fit finds the knee and predicts batch-1 decode within 3% (a straight line through
    both regimes, the fit before the knee existed, is more than 5% off there)."""
    truth = {"c0": 0.012, "c_tok": 1e-4, "c_tok_mid": 1.2e-3, "c_samp": 3e-4, "c_pair": 1e-9, "c_kv": 1e-7,
             "tok_knee": 8}
    samples = [{**s, "tag": f"shape {i}"} for i, s in enumerate(synthetic_samples(truth, n=80, seed=1))]
    for i, b in enumerate((1, 2, 3, 4, 6, 8)):  # make sure the small batches are measured
        cal = Calibration(model="smollm2-135m", coef=truth)
        samples.append({"T": b, "S": b, "A": b * 300, "K": b * 300, "B": b, "tag": f"small {i}",
                        "seconds": cal.step_time(b, b, b * 300, b * 300, b)})
    coef, quality = fit(samples)
    assert coef["tok_knee"] == 8
    got = Calibration(model="smollm2-135m", coef=coef)
    want = Calibration(model="smollm2-135m", coef=truth)
    for b in (1, 2, 32):
        assert got.step_time(b, b, b * 300, b * 300, b) == pytest.approx(want.step_time(b, b, b * 300, b * 300, b),
                                                                         rel=0.03)
    assert quality["mean_abs_rel_error"] < 0.02
    monkeypatch.setattr(calibration, "TOK_KNEES", (10**9,))  # no knee: one straight line
    line = Calibration(model="smollm2-135m", coef=fit(samples)[0])
    one = want.step_time(1, 1, 300, 300, 1)
    assert abs(line.step_time(1, 1, 300, 300, 1) / one - 1) > 0.05


def test_file_round_trip_and_scaling(tmp_path):
    cal = Calibration(model="smollm2-135m", coef=dict.fromkeys(FEATURES, 1e-4), server={"step_s": 1e-3},
                      date="2026-01-01", machine={"cpu": "x"})
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_json()))
    back = load_calibration(str(path))
    assert back.step_time(10, 1, 100, 10, 1) == pytest.approx(cal.step_time(10, 1, 100, 10, 1))
    big = back.scaled_for(get_model("llama-3.1-8b"))
    assert big.step_time(10, 1, 0, 0, 1) > 10 * back.step_time(10, 1, 0, 0, 1) / 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError):
        load_calibration(str(bad))


def test_shipped_calibration_is_complete():
    cal = load_calibration()
    assert cal is not None, "run `splitserve simulate calibrate` and commit splitserve/sim/data/local_cpu.json"
    assert cal.model == "smollm2-135m" and cal.samples and cal.date and cal.machine.get("cpu")
    assert set(FEATURES) <= set(cal.coef)
    decode = cal.step_time(1, 1, 256, 256, 1)
    prefill = cal.step_time(512, 1, 512 * 513 // 2, 512, 1)
    assert 0 < decode < prefill


def _local_1p1d(tmp_path, neighbor):
    """A local-cpu 1P1D run with the shipped coefficients and the given neighbour factors."""
    from splitserve.bench.schema import load_results
    from splitserve.cli import main

    base = load_calibration()
    cal = Calibration(model=base.model, coef=base.coef, neighbor=neighbor)
    path = tmp_path / f"cal-{len(neighbor)}.json"
    path.write_text(json.dumps(cal.to_json()))
    out = tmp_path / f"r-{len(neighbor)}.json"
    assert main(["simulate", "--model", "smollm2-135m", "--prefill", "local-cpu:1", "--decode", "local-cpu:1",
                 "--link", "tcp-loopback", "--calibration", str(path), "--rate", "2", "--num-requests", "60",
                 "--input-len", "256", "--output-len", "32", "--seed", "3", "--output", str(out), "--quiet"]) == 0
    return load_results(str(out))[0].summary


def test_neighbor_factors_slow_steps_only_while_the_other_worker_computes(tmp_path):
    """Two local-cpu workers share the host: a decode step beside a busy prefill worker runs
    (1 + f) longer, and the reverse; without factors nothing changes."""
    plain = _local_1p1d(tmp_path, {})
    slowed = _local_1p1d(tmp_path, {"decode": 0.5, "prefill": 0.25})
    assert slowed.completed == plain.completed == 60
    assert slowed.tpot_ms.mean > plain.tpot_ms.mean * 1.05  # decode steps overlap prefills often here
    assert slowed.tpot_ms.mean < plain.tpot_ms.mean * 1.5  # but never more than the factor
    assert slowed.ttft_ms.p50 > plain.ttft_ms.p50


def test_live_step_terms_apply_to_their_role_and_step_kind_only(tmp_path):
    """`server.live_steps` (measured by sim_vs_live.py --fit-overhead): in the live server a
    prefill worker's prefill steps run x1.25 and an aggregated worker's decode-only steps 3 ms
    longer; every other (role, step kind) keeps the engine-alone time; the terms survive a file
    round trip and model scaling, and are not written as an attribute of their own."""
    base = load_calibration()
    cal = Calibration(model=base.model, coef=base.coef,
                      server={"live_steps": {"prefill": {"prefill_scale": 1.25}, "both": {"decode_extra_s": 0.003}}})
    prefill = (256, 1, 256 * 257 // 2, 256, 1, 1)
    decode = (4, 4, 800, 800, 4, 0)
    assert cal.for_role("prefill").step_time(*prefill) == pytest.approx(1.25 * cal.step_time(*prefill))
    assert cal.for_role("prefill").step_time(*decode) == cal.step_time(*decode)
    assert cal.for_role("both").step_time(*decode) == pytest.approx(cal.step_time(*decode) + 0.003)
    assert cal.for_role("both").step_time(*prefill) == cal.step_time(*prefill)
    assert cal.for_role("decode").step_time(*decode) == cal.step_time(*decode)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_json()))
    back = load_calibration(str(path))
    assert "live_step" not in json.loads(path.read_text())
    big = get_model("llama-3.1-8b")
    assert back.scaled_for(big).for_role("prefill").step_time(*prefill) == pytest.approx(
        1.25 * back.scaled_for(big).step_time(*prefill))


def test_another_model_pays_its_weight_bound_floor():
    """Below tok_knee a step reads the weights once (kept in c0 by the fit): a model with 60x the
    parameters pays the floor ~60x over, so its batch-1 decode costs far more than the demo's,
    and batch 1 to the knee still costs about the same."""
    cal = load_calibration("splitserve/sim/data/local_cpu_1t.json")
    knee = int(cal.coef["tok_knee"])
    small = cal.step_time(1, 1, 300, 300, 1)
    big = cal.scaled_for(get_model("llama-3.1-8b"))
    one = big.step_time(1, 1, 300, 300, 1)
    assert one > 10 * small
    assert big.step_time(knee, knee, knee * 300, knee * 300, knee) < 1.25 * one
