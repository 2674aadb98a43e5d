"""Live against simulated on this machine: the same `splitserve bench` workload against the live
server and through the simulator (`local-cpu`, the calibration file), at several request rates.

    python benchmarks/sim_vs_live.py                         # aggregated, rates from --rates
    python benchmarks/sim_vs_live.py --disaggregated          # 1 prefill + 1 decode worker
    python benchmarks/sim_vs_live.py --fit-overhead           # first measure the server's own
                                                              # overheads at a low rate and store
                                                              # them in the calibration file

Target: mean TPOT within 5% and p90 TTFT within 10% at every rate, including one near saturation.
The overhead fit (--fit-overhead) uses its own rates and prompts, never the validation ones: a
worker's busy time per engine step live over simulated is its role's step scale (the engine in
the server, beside the gateway, the client and the other worker, against the engine measured
alone); then the gap in TTFT is the gateway's per-request cost (HTTP, tokenizer, ZeroMQ
hand-off) and the gap in TPOT the per-step cost of the worker loop. Each row also prints the
live/simulated busy time per step of each role.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

STATS_SETTLE_S = 0.6
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--model", "demo", "--port", str(port),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--log-level", "WARNING"]
    if args.disaggregated:
        cmd += ["--disaggregated", "--prefill-workers", "1", "--decode-workers", "1"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.repeats > 1:  # a repeat sends the same prompts: the prefix cache must not answer them
        cmd += ["--no-prefix-caching"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError("server not ready in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def workload_args(args, rate: float) -> list[str]:
    return ["--num-requests", str(args.num_requests), "--rate", f"{rate:g}", "--input-len", args.input_len,
            "--output-len", args.output_len, "--seed", str(args.seed), "--max-num-seqs", str(args.max_num_seqs)]


def _cpu_busy_jiffies() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return user + nice + system + irq + softirq + steal


def _tree_jiffies(root_pids: list[int]) -> int:
    """utime + stime (+ children's, reaped) of these processes and all their descendants."""
    total = 0
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        pid = int(d)
        stats[pid] = fields
        children.setdefault(int(fields[1]), []).append(pid)
    todo = list(root_pids)
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        f = stats[pid]
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo.extend(children.get(pid, []))
    return total


def _own_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return 0
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Quiet:
    """Measures how much CPU processes other than ours took during a live run (this machine is
    shared): busy jiffies of the whole machine minus those of the server tree and this script's
    tree (the bench client). Also where our own CPU went, in cores: the gateway process, each
    worker process, the bench client (what the simulator's workers do not share their cores with)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.pids = [server_pid, os.getpid()]

    def _ours(self) -> dict[str, int]:
        # The server is this script's child: the client is this script's tree without it.
        out = {"gateway": _own_jiffies(self.server_pid),
               "client": _tree_jiffies([os.getpid()]) - _tree_jiffies([self.server_pid])}
        for i, child in enumerate(_children(self.server_pid)):
            out[f"worker{i}"] = _tree_jiffies([child])
        return out

    def __enter__(self):
        self.t0 = time.time()
        self.busy0 = _cpu_busy_jiffies()
        self.ours0 = _tree_jiffies(self.pids)
        self.split0 = self._ours()
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.time() - self.t0
        foreign = (_cpu_busy_jiffies() - self.busy0) - (_tree_jiffies(self.pids) - self.ours0)
        self.foreign_share = max(0.0, foreign / hz / (wall * (os.cpu_count() or 1)))
        split1 = self._ours()
        self.cores = {k: (split1[k] - self.split0.get(k, 0)) / hz / wall for k in split1}
        return False


def run_live(args, port: int, rate: float, out: str) -> dict:
    cmd = [sys.executable, "-m", "splitserve.cli", "bench", "--base-url", f"http://127.0.0.1:{port}",
           "--endpoint", "completions", "--tokenizer", "demo", "--num-requests", str(args.num_requests),
           "--rate", f"{rate:g}", "--input-len", args.input_len, "--output-len", args.output_len,
           "--seed", str(args.seed), "--output", out, "--quiet"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def run_sim(args, rate: float, out: str, calibration: str | None) -> dict:
    cmd = [sys.executable, "-m", "splitserve.cli", "simulate", "--model", "demo", "--num-requests",
           str(args.num_requests), "--rate", f"{rate:g}", "--input-len", args.input_len, "--output-len",
           args.output_len, "--seed", str(args.seed), "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--output", out, "--quiet"]
    if args.disaggregated:
        cmd += ["--prefill", "local-cpu:1", "--decode", "local-cpu:1", "--link", "tcp-loopback"]
    else:
        cmd += ["--hardware", "local-cpu:1"]
    if calibration:
        cmd += ["--calibration", calibration]
    if args.repeats > 1:
        cmd += ["--no-prefix-caching"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def metrics(doc: dict) -> dict:
    s = doc["summary"]
    return {"tpot_mean": s["tpot_ms"]["mean"], "ttft_p90": s["ttft_ms"]["p90"], "ttft_p50": s["ttft_ms"]["p50"],
            "throughput": s["output_token_throughput"], "completed": s["completed"]}


KINDS = ("decode", "prefill")  # decode-only steps; steps with a prefill chunk


def worker_steps(port: int) -> dict[str, dict[str, list[float]]]:
    """{role: {kind: [engine steps, seconds inside them]}} over the live server's workers (/cluster)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/cluster", timeout=10) as r:
        info = json.load(r)
    out: dict[str, dict[str, list[float]]] = {}
    for w in info["workers"]:
        ld = w.get("load") or {}
        acc = out.setdefault(w["role"], {k: [0.0, 0.0] for k in KINDS})
        acc["decode"][0] += ld.get("decode_steps", 0)
        acc["decode"][1] += ld.get("decode_step_seconds", 0.0)
        acc["prefill"][0] += ld.get("num_steps", 0) - ld.get("decode_steps", 0)
        acc["prefill"][1] += ld.get("step_seconds", 0.0) - ld.get("decode_step_seconds", 0.0)
    return out


def sim_steps(doc: dict) -> dict[str, dict[str, list[float]]]:
    """The same from a simulated run, per pool."""
    return {p["role"]: {"decode": [p["decode_steps"], p["decode_busy_s"]],
                        "prefill": [p["steps"] - p["decode_steps"], p["busy_s"] - p["decode_busy_s"]]}
            for p in doc["config"]["extra"]["deployment"]["pools"]}


def time_per_step(live: dict, sim: dict, min_steps: int = 5) -> dict[str, dict[str, tuple[float, float]]]:
    """{role: {kind: (live seconds per step, simulated seconds per step)}} where both ran at least
    `min_steps` steps of that kind."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for role, kinds in live.items():
        for kind, (n, secs) in kinds.items():
            sn, ss = sim.get(role, {}).get(kind, (0, 0.0))
            if n >= min_steps and sn >= min_steps and ss > 0:
                out.setdefault(role, {})[kind] = (secs / n, ss / sn)
    return out


def run_live_quiet(args, proc, port: int, rate: float, out: str) -> tuple[dict, float]:
    """A live run during which other processes took at most --max-foreign of the CPUs; retried
    (up to --tries) otherwise; the quietest run is returned with its foreign share."""
    best = None
    for attempt in range(args.tries):
        q = Quiet(proc.pid)
        before = worker_steps(port)
        with q:
            doc = run_live(args, port, rate, out)
        time.sleep(STATS_SETTLE_S)  # the workers report their counters every 0.25 s
        after = worker_steps(port)
        if best is None or q.foreign_share < best[1]:
            best = (doc, q.foreign_share)
            doc["_cores"] = q.cores
            zero = {k: [0, 0.0] for k in KINDS}
            steps = {role: {k: [after[role][k][0] - before.get(role, zero)[k][0],
                                after[role][k][1] - before.get(role, zero)[k][1]] for k in KINDS}
                     for role in after}
            # A worker restarted during the run starts its counters again: no step data then.
            ok = all(n >= 0 and secs >= 0 for kinds in steps.values() for n, secs in kinds.values())
            doc["_steps"] = steps if ok else {}
        if q.foreign_share <= args.max_foreign:
            break
        print(f"  rate {rate:g}: other processes took {q.foreign_share:.0%} of the CPUs; again", flush=True)
        time.sleep(args.backoff)
    return best


def fit_overhead(args, proc, port: int, tmp: str) -> None:
    """The live server's own costs around the calibrated engine, as the simulator models them.
    From live runs at --fit-rates (never validated), each repeated --fit-repeats times on fresh
    prompts:

    * `live_steps` per worker role, measured, not fitted: the worker's busy time per engine step
      in the live server (/cluster `step_seconds`, `decode_step_seconds`, ...) against the
      simulator's for the same workload: for decode-only steps the difference (seconds added to
      each), for steps with a prefill chunk the ratio. It holds what the engine-alone calibration
      cannot see: the gateway, the client and the other worker sharing the cores and caches, a
      prefill worker shipping KV.
    * then, with the scale in place, `step_s` per step and `token_s` per token streamed in a step
      (the worker loop around the step), and `request_s` per request (HTTP, tokenizer,
      hand-off), solved from mean TPOT(live) = TPOT(sim) and the p50 TTFT gap, refined three
      times, damped and bounded; only the terms named in --fit-terms are kept."""
    import numpy as np

    from splitserve.sim.calibration import DEFAULT_PATH

    path = args.calibration or DEFAULT_PATH
    cal_doc = json.load(open(path))
    # One file serves the aggregated (role "both") and the 1P1D (prefill, decode) deployments of its
    # thread count: this fit replaces the terms of the roles it measures and keeps the others.
    kept_steps = dict(cal_doc.get("server", {}).get("live_steps", {}))
    n, seed = args.num_requests, args.seed
    args.num_requests = args.fit_requests
    rates = [float(x) for x in args.fit_rates.split(",")]
    terms = set(args.fit_terms.split(","))
    lives, live_steps = [], []
    trial = os.path.join(tmp, "cal_trial.json")
    try:
        for i, rate in enumerate(rates):
            runs = []
            for k in range(args.fit_repeats):
                args.seed = seed + 100 + 10 * i + k  # prompts no validation run sends
                doc, foreign = run_live_quiet(args, proc, port, rate, os.path.join(tmp, f"fit_live_{i}_{k}.json"))
                runs.append(metrics(doc))
                live_steps.append((i, k, doc["_steps"]))
                print(f"  fit run at {rate:g} req/s: live TPOT {runs[-1]['tpot_mean']:.2f} ms, p50 TTFT "
                      f"{runs[-1]['ttft_p50']:.1f} ms; other processes {foreign:.0%} of the CPUs", flush=True)
            lives.append({k: sum(r[k] for r in runs) / len(runs) for k in runs[0]})
        server: dict = {"step_s": 0.0, "token_s": 0.0, "request_s": 0.0}
        if "scale" in terms:
            cal_doc["server"] = dict(server)
            json.dump(cal_doc, open(trial, "w"))
            pairs: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for i, k, live in live_steps:
                args.seed = seed + 100 + 10 * i + k
                sim = sim_steps(run_sim(args, rates[i], os.path.join(tmp, f"fit_sim_{i}_{k}.json"), trial))
                for role, kinds in time_per_step(live, sim).items():
                    for kind, pair in kinds.items():
                        pairs.setdefault((role, kind), []).append(pair)
            server["live_steps"] = {}
            for (role, kind), got in pairs.items():
                entry = server["live_steps"].setdefault(role, {})
                if kind == "decode":  # seconds added per decode-only step (at most halving the shortest)
                    extra = float(np.mean([lv - sm for lv, sm in got]))
                    entry["decode_extra_s"] = round(max(extra, -0.5 * min(sm for _, sm in got)), 6)
                else:  # factor on a step with a prefill chunk
                    entry["prefill_scale"] = round(float(np.mean([lv / sm for lv, sm in got])), 4)
                print(f"  {role} worker, {kind} steps: live / simulated ms per step "
                      + ", ".join(f"{lv * 1e3:.2f}/{sm * 1e3:.2f}" for lv, sm in got), flush=True)
        for _ in range(3):
            cal_doc["server"] = server
            json.dump(cal_doc, open(trial, "w"))
            rows, ys, ttft = [], [], []
            for i, rate in enumerate(rates):
                args.seed = seed + 100 + 10 * i
                sim_doc = run_sim(args, rate, os.path.join(tmp, f"fit_sim_{i}.json"), trial)
                sim = metrics(sim_doc)
                per_step = sim_doc["summary"]["total_output_tokens"] / max(sim_doc["config"]["extra"]["sim"]["steps"], 1)
                rows.append([1.0, per_step])
                ys.append((lives[i]["tpot_mean"] - sim["tpot_mean"]) / 1000.0)
                ttft.append((lives[i]["ttft_p50"] - sim["ttft_p50"]) / 1000.0)
            # Least squares over the per-step terms asked for; a term the solve would push below 0
            # is dropped and the rest solved again (clamping it after a joint solve left the other
            # term carrying an ill-conditioned 2x2 solution: +1.7 ms per step, TPOT +14-19%).
            cols = [j for j, key in enumerate(("step", "token")) if key in terms][: len(rates)]
            delta = [0.0, 0.0]
            gaps = np.array(ys)
            while cols:
                X = np.array(rows)[:, cols]
                sol, *_ = np.linalg.lstsq(X, gaps, rcond=None)
                new = {j: server[("step_s", "token_s")[j]] + 0.7 * float(x) for j, x in zip(cols, sol)}
                neg = [j for j, v in new.items() if v < 0]
                if not neg:
                    for j, x in zip(cols, sol):
                        delta[j] = float(x)
                    break
                for j in neg:  # this term cannot explain the gap: drop it, solve the others
                    cols.remove(j)
                    old = server[("step_s", "token_s")[j]]
                    delta[j] = -old / 0.7
                    gaps = gaps + old * np.array(rows)[:, j]  # the simulator ran with it
            server.update({"step_s": min(0.03, max(0.0, server["step_s"] + 0.7 * delta[0])),
                           "token_s": min(0.005, max(0.0, server["token_s"] + 0.7 * delta[1])),
                           "request_s": min(0.5, max(0.0, server["request_s"] + 0.7 * ttft[0]))})
            for key in ("step_s", "token_s", "request_s"):
                if key.removesuffix("_s") not in terms:
                    server[key] = 0.0
    finally:
        args.num_requests, args.seed = n, seed
    server["live_steps"] = {**kept_steps, **server.get("live_steps", {})}
    server.update({"fitted_at_rates": rates, "fit_terms": sorted(terms), "date": time.strftime("%Y-%m-%d %H:%M")})
    cal_doc["server"] = server
    with open(path, "w") as f:
        json.dump(cal_doc, f, indent=1)
        f.write("\n")
    scale = "; ".join(f"{r} worker: " + ", ".join(f"{k} {v:g}" for k, v in kv.items())
                      for r, kv in server.get("live_steps", {}).items())
    print(f"server overheads: {scale or 'no live step terms'}; +{server['step_s'] * 1e3:.2f} ms per step, "
          f"+{server['token_s'] * 1e3:.2f} ms per token streamed in a step, +{server['request_s'] * 1e3:.2f} ms "
          f"per request -> {path}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,1.75,2.1", help="validation rates, req/s (the last near saturation: "
                    "the live demo server saturates near 2.2 req/s on this 2-core machine)")
    ap.add_argument("--num-requests", type=int, default=80)
    ap.add_argument("--input-len", default="uniform:64:320")
    ap.add_argument("--output-len", default="48")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--disaggregated", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per live worker (default: the server's); 1 selects the 1-thread "
                         "calibration (local_cpu_1t.json) unless --calibration is given")
    ap.add_argument("--calibrate", action="store_true",
                    help="first measure the engine alone into the calibration file (`splitserve simulate "
                         "calibrate`, with the live workers' threads; --neighbor for 1P1D), so the "
                         "calibration, the overhead fit and the validation happen within minutes: this "
                         "machine's speed drifts by 10-20%% over hours")
    ap.add_argument("--fit-overhead", action="store_true")
    ap.add_argument("--fit-rates", default="0.5,1.4", help="rates of the overhead fit (not validated)")
    ap.add_argument("--fit-terms", default="scale,request",
                    help="which server overheads to fit: scale (per-role live step terms, measured), step, "
                         "token, request (comma-separated)")
    ap.add_argument("--fit-each-rate", action="store_true",
                    help="measure the live-step terms again right before each validation rate, at that rate "
                         "on other prompts (into a copy of the calibration file): separates this machine's "
                         "drift over minutes from the model's error")
    ap.add_argument("--fit-requests", type=int, default=40)
    ap.add_argument("--fit-repeats", type=int, default=2)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="retry a live run when other processes took more than this share of the CPUs")
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--backoff", type=float, default=20.0, help="seconds to wait before a retry")
    ap.add_argument("--repeats", type=int, default=1,
                    help="live runs per validation rate, each of the same workload (prefix caching off on "
                         "both sides); the simulator is compared with their mean, and the spread between "
                         "them is how far this machine's own runs disagree")
    ap.add_argument("--warmup", type=int, default=8, help="requests sent first and not measured (cold start)")
    ap.add_argument("--output", default=None, help="write the comparison as JSON")
    args = ap.parse_args()
    if (args.disaggregated or args.threads == 1) and args.calibration is None:
        # The live 1P1D server gives each worker one of the two cores (and --threads 1 one core to
        # the aggregated worker): use the 1-thread calibration.
        from splitserve.sim.calibration import DEFAULT_PATH

        one_thread = os.path.join(os.path.dirname(DEFAULT_PATH), "local_cpu_1t.json")
        if os.path.isfile(one_thread):
            args.calibration = one_thread

    if args.calibrate:
        from splitserve.sim.calibration import DEFAULT_PATH

        cmd = [sys.executable, "-m", "splitserve.cli", "simulate", "calibrate", "--output",
               args.calibration or DEFAULT_PATH]
        threads = 1 if args.disaggregated else args.threads
        if threads:
            cmd += ["--threads", str(threads)]
        if args.disaggregated:
            cmd += ["--neighbor"]
        print("calibrating: " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        args.fit_overhead = True  # the old live-step terms belong to the old calibration
    tmp = tempfile.mkdtemp(prefix="sim-vs-live-")
    if args.fit_each_rate:
        from splitserve.sim.calibration import DEFAULT_PATH

        copy = os.path.join(tmp, "calibration.json")
        shutil.copyfile(args.calibration or DEFAULT_PATH, copy)
        args.calibration = copy
    port = free_port()
    proc = start_server(args, port, os.path.join(tmp, "server.log"))
    rows = []
    try:
        if args.warmup:
            n, seed = args.num_requests, args.seed
            args.num_requests, args.seed = args.warmup, seed + 1000
            run_live(args, port, float(args.rates.split(",")[0]), os.path.join(tmp, "warmup.json"))
            args.num_requests, args.seed = n, seed
        if args.fit_overhead:
            fit_overhead(args, proc, port, tmp)
        base_seed = args.seed
        for i, rate in enumerate(float(x) for x in args.rates.split(",")):
            # Each run its own prompts: the live server keeps its prefix cache between runs, and a
            # second run of the same prompts would hit it everywhere (the simulator's would not).
            if args.fit_each_rate:
                args.fit_rates = f"{rate:g}"
                args.seed = base_seed + 10 * (i + 1)  # the fit's prompts: seed + 100 + ..., none validated
                fit_overhead(args, proc, port, tmp)
            args.seed = base_seed + i
            repeats = []
            for k in range(args.repeats):
                doc, foreign = run_live_quiet(args, proc, port, rate, os.path.join(tmp, f"live_{rate:g}_{k}.json"))
                repeats.append((doc, foreign, metrics(doc)))
            live = {key: sum(m[key] for _, _, m in repeats) / len(repeats) for key in repeats[0][2]}
            doc, foreign = repeats[-1][0], max(f for _, f, _ in repeats)
            sim_doc = run_sim(args, rate, os.path.join(tmp, f"sim_{rate:g}.json"), args.calibration)
            sim = metrics(sim_doc)
            cores = doc.pop("_cores", {})
            live_steps = doc.pop("_steps", {})
            step_ratio = {f"{role} {kind}": lv / sm for role, kinds in time_per_step(live_steps, sim_steps(sim_doc)).items()
                          for kind, (lv, sm) in kinds.items()}
            spread = {key: max(m[key] for _, _, m in repeats) / min(m[key] for _, _, m in repeats) - 1
                      for key in ("tpot_mean", "ttft_p90")}
            row = {"rate": rate, "live": live, "sim": sim, "foreign_cpu_share": foreign, "cores": cores,
                   "live_repeats": [m for _, _, m in repeats], "live_spread": spread,
                   "step_time_live_over_sim": step_ratio,
                   "tpot_err": sim["tpot_mean"] / live["tpot_mean"] - 1,
                   "ttft_p90_err": sim["ttft_p90"] / live["ttft_p90"] - 1}
            rows.append(row)
            print(f"rate {rate:g}/s: TPOT mean live {live['tpot_mean']:.2f} sim {sim['tpot_mean']:.2f} ms "
                  f"({row['tpot_err'] * 100:+.1f}%), TTFT p90 live {live['ttft_p90']:.1f} sim {sim['ttft_p90']:.1f} ms "
                  f"({row['ttft_p90_err'] * 100:+.1f}%), throughput live {live['throughput']:.1f} sim "
                  f"{sim['throughput']:.1f} tok/s; other processes {foreign:.0%} of the CPUs; our cores: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()) + "; live/sim time per step: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in step_ratio.items()), flush=True)
            if args.repeats > 1:
                print(f"  {args.repeats} live runs of this workload: TPOT "
                      + " / ".join(f"{m['tpot_mean']:.2f}" for _, _, m in repeats) + " ms, p90 TTFT "
                      + " / ".join(f"{m['ttft_p90']:.1f}" for _, _, m in repeats)
                      + f" ms (spread {spread['tpot_mean'] * 100:.1f}% / {spread['ttft_p90'] * 100:.1f}%)", flush=True)
        args.seed = base_seed
    finally:
        stop_server(proc)
    print("\n| rate req/s | mean TPOT live ms | sim ms | error | p90 TTFT live ms | sim ms | error | other CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rate']:g} | {r['live']['tpot_mean']:.2f} | {r['sim']['tpot_mean']:.2f} | "
              f"{r['tpot_err'] * 100:+.1f}% | {r['live']['ttft_p90']:.1f} | {r['sim']['ttft_p90']:.1f} | "
              f"{r['ttft_p90_err'] * 100:+.1f}% | {r['foreign_cpu_share']:.0%} |")
    ok = all(abs(r["tpot_err"]) <= 0.05 and abs(r["ttft_p90_err"]) <= 0.10 for r in rows)
    print(f"\ntarget (TPOT within 5%, p90 TTFT within 10%): {'met' if ok else 'NOT met'}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
