"""`splitserve accel build`: the scheduler's modules compiled with mypyc simulate exactly what the
pure-Python source does, are used only when built from the current sources, and pass the
scheduler and simulator tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mypyc")
if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
    pytest.skip("no C compiler", allow_module_level=True)

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Deployments that reach every scheduler path the simulator uses: aggregated, several replicas
# (router), 1P1D with KV transfer, conditional disaggregation with shared prefixes, agent chains,
# preemption under a small KV pool, prefix caching off.
RUNS = {
    "agg": "--hardware h100:1 --num-requests 150 --rate 20 --input-len uniform:64:1500 --output-len uniform:1:300",
    "agg2": "--hardware h100:2 --num-requests 150 --rate 40 --input-len uniform:64:1500 --output-len uniform:1:200",
    "disagg": "--prefill h100:1 --decode h100:1 --num-requests 120 --rate 15 --input-len uniform:64:2000 "
              "--output-len uniform:1:200",
    "cond": "--prefill h100:2 --decode h100:2 --local-prefill-threshold 256 --workload shared-prefix --prefix-len 700 "
            "--num-prefixes 3 --input-len uniform:10:400 --num-requests 120 --rate 30",
    "agent": "--hardware h100:1 --workload agent --sessions 6 --steps 5 --system-len 500 --num-requests 12 --rate 4",
    "preempt": "--hardware h100:1 --max-kv-blocks 300 --block-size 8 --max-num-batched-tokens 256 --num-requests 150 "
               "--rate 60 --input-len uniform:16:700 --output-len uniform:1:300",
    "nocache": "--hardware h100:1 --no-prefix-caching --num-requests 100 --rate 20",
}
SCRIPT = """
import json, sys
from splitserve import accel
from splitserve.cli import main
out = sys.argv[1]
for name, args in json.loads(sys.argv[2]).items():
    assert main(["simulate", *args.split(), "--seed", "3", "--quiet", "--output", f"{out}/{name}.json"]) == 0
print(json.dumps({"compiled": accel.describe()}))
"""
WALL = {"wall_s", "requests_per_wall_s", "events_per_wall_s", "started_at", "date"}


def _env(cache: str, pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_PURE_PYTHON"}
    env["SPLITSERVE_ACCEL_DIR"] = cache
    if pure:
        env["SPLITSERVE_PURE_PYTHON"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in WALL}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("accel"))
    proc = subprocess.run([sys.executable, "-m", "splitserve.cli", "accel", "build"], cwd=ROOT,
                          env=_env(cache, pure=False), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return cache


def _simulate(cache: str, out: str, pure: bool) -> str:
    os.makedirs(out)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, out, json.dumps(RUNS)], cwd=ROOT,
                          env=_env(cache, pure), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["compiled"]


def test_compiled_build_simulates_exactly_like_the_source(build, tmp_path):
    assert _simulate(build, str(tmp_path / "compiled"), pure=False) == "mypyc-compiled scheduler"
    assert _simulate(build, str(tmp_path / "pure"), pure=True) == "pure-Python scheduler"
    for name in RUNS:
        with open(tmp_path / "compiled" / f"{name}.json") as f:
            compiled = _strip(json.load(f))
        with open(tmp_path / "pure" / f"{name}.json") as f:
            pure = _strip(json.load(f))
        assert compiled["summary"]["completed"] > 0
        assert compiled == pure, f"{name}: compiled and pure-Python simulations differ"


def test_a_build_of_other_sources_is_ignored(build, tmp_path):
    from splitserve import accel

    # The same files under another source tag: what a build looks like after the sources changed.
    (tag,) = [d for d in os.listdir(build) if os.path.isfile(os.path.join(build, d, "manifest.json"))]
    stale = tmp_path / "stale"
    other = stale / ("0" * 20)
    shutil.copytree(os.path.join(build, tag), other)
    doc = json.loads((other / "manifest.json").read_text())
    doc["tag"] = "0" * 20
    (other / "manifest.json").write_text(json.dumps(doc))
    probe = "from splitserve import accel; print(accel.describe())"
    got = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=_env(str(stale), pure=False),
                         capture_output=True, text=True, timeout=120)
    assert got.stdout.strip() == "pure-Python scheduler", got.stderr
    assert accel.source_tag() == tag  # and the real build is the one for these sources


def test_scheduler_and_simulator_tests_pass_compiled(build):
    # Two tests swap methods on Scheduler (the decode lane off, a reference subclass) to compare the
    # source's fast paths with its general path; a compiled class cannot be patched, so they run
    # only against the source (the comparison above covers the compiled paths).
    patched = ["tests/test_scheduler.py::test_decode_lane_and_stop_shortcut_change_nothing",
               "tests/test_scheduler.py::test_decode_lane_at_a_block_boundary_without_a_free_block_preempts_like_the_general_path",
               "tests/sim/test_simulator.py::test_scheduler_fast_paths_leave_simulated_results_unchanged"]
    env = _env(build, pure=False)
    env["SPLITSERVE_PURE_PYTHON"] = ""  # conftest sets it only when absent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scheduler.py",
           "tests/sim/test_simulator.py", "tests/test_router.py"] + [a for p in patched for a in ("--deselect", p)]
    probe = subprocess.run([sys.executable, "-c", "from splitserve import accel; print(accel.describe())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "mypyc-compiled scheduler", probe.stderr
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout.splitlines()[-1]
