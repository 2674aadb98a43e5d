"""local-cpu calibration: the fit, the file format, the shipped file."""

from __future__ import annotations

import json
import random

import pytest

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
