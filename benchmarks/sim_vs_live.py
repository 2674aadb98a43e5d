"""Live against simulated on this machine: the same `splitserve bench` workload against the live
server and through the simulator (`local-cpu`, the calibration file), at several request rates.

    python benchmarks/sim_vs_live.py                         # aggregated, rates from --rates
    python benchmarks/sim_vs_live.py --disaggregated          # 1 prefill + 1 decode worker
    python benchmarks/sim_vs_live.py --fit-overhead           # first measure the server's own
                                                              # overheads at a low rate and store
                                                              # them in the calibration file

Target: mean TPOT within 5% and p90 TTFT within 10% at every rate, including one near saturation.
The overhead fit (--fit-overhead) uses its own low rate, never the validation rates: the gap in
TTFT between live and simulated at that rate is the gateway's per-request cost (HTTP, tokenizer,
ZeroMQ hand-off), the gap in TPOT the per-step cost of the worker loop and the gateway sharing
the two cores with the engine.
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
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def metrics(doc: dict) -> dict:
    s = doc["summary"]
    return {"tpot_mean": s["tpot_ms"]["mean"], "ttft_p90": s["ttft_ms"]["p90"], "ttft_p50": s["ttft_ms"]["p50"],
            "throughput": s["output_token_throughput"], "completed": s["completed"]}


def fit_overhead(args, port: int, tmp: str) -> None:
    from splitserve.sim.calibration import DEFAULT_PATH, load_calibration

    path = args.calibration or DEFAULT_PATH
    cal_doc = json.load(open(path))
    cal_doc["server"] = {}
    zero = os.path.join(tmp, "cal0.json")
    json.dump(cal_doc, open(zero, "w"))
    live = metrics(run_live(args, port, args.fit_rate, os.path.join(tmp, "fit_live.json")))
    sim = metrics(run_sim(args, args.fit_rate, os.path.join(tmp, "fit_sim.json"), zero))
    cal = load_calibration(zero)
    del cal
    step_s = max(0.0, (live["tpot_mean"] - sim["tpot_mean"]) / 1000.0)
    request_s = max(0.0, (live["ttft_p50"] - sim["ttft_p50"]) / 1000.0 - step_s)
    cal_doc["server"] = {"step_s": step_s, "request_s": request_s,
                         "fitted_at_rate": args.fit_rate, "date": time.strftime("%Y-%m-%d")}
    with open(path, "w") as f:
        json.dump(cal_doc, f, indent=1)
        f.write("\n")
    print(f"server overheads at {args.fit_rate} req/s: +{step_s * 1e3:.2f} ms per step, "
          f"+{request_s * 1e3:.2f} ms per request (live TPOT {live['tpot_mean']:.2f} vs sim {sim['tpot_mean']:.2f} ms; "
          f"live p50 TTFT {live['ttft_p50']:.1f} vs sim {sim['ttft_p50']:.1f} ms) -> {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,2,3", help="validation rates, req/s (the last near saturation)")
    ap.add_argument("--num-requests", type=int, default=80)
    ap.add_argument("--input-len", default="uniform:64:320")
    ap.add_argument("--output-len", default="48")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--disaggregated", action="store_true")
    ap.add_argument("--fit-overhead", action="store_true")
    ap.add_argument("--fit-rate", type=float, default=0.3)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--output", default=None, help="write the comparison as JSON")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="sim-vs-live-")
    port = free_port()
    proc = start_server(args, port, os.path.join(tmp, "server.log"))
    rows = []
    try:
        if args.fit_overhead:
            fit_overhead(args, port, tmp)
        for rate in [float(x) for x in args.rates.split(",")]:
            live = metrics(run_live(args, port, rate, os.path.join(tmp, f"live_{rate:g}.json")))
            sim = metrics(run_sim(args, rate, os.path.join(tmp, f"sim_{rate:g}.json"), args.calibration))
            row = {"rate": rate, "live": live, "sim": sim,
                   "tpot_err": sim["tpot_mean"] / live["tpot_mean"] - 1,
                   "ttft_p90_err": sim["ttft_p90"] / live["ttft_p90"] - 1}
            rows.append(row)
            print(f"rate {rate:g}/s: TPOT mean live {live['tpot_mean']:.2f} sim {sim['tpot_mean']:.2f} ms "
                  f"({row['tpot_err'] * 100:+.1f}%), TTFT p90 live {live['ttft_p90']:.1f} sim {sim['ttft_p90']:.1f} ms "
                  f"({row['ttft_p90_err'] * 100:+.1f}%), throughput live {live['throughput']:.1f} sim "
                  f"{sim['throughput']:.1f} tok/s", flush=True)
    finally:
        stop_server(proc)
    print("\n| rate req/s | mean TPOT live ms | sim ms | error | p90 TTFT live ms | sim ms | error |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rate']:g} | {r['live']['tpot_mean']:.2f} | {r['sim']['tpot_mean']:.2f} | "
              f"{r['tpot_err'] * 100:+.1f}% | {r['live']['ttft_p90']:.1f} | {r['sim']['ttft_p90']:.1f} | "
              f"{r['ttft_p90_err'] * 100:+.1f}% |")
    ok = all(abs(r["tpot_err"]) <= 0.05 and abs(r["ttft_p90_err"]) <= 0.10 for r in rows)
    print(f"\ntarget (TPOT within 5%, p90 TTFT within 10%): {'met' if ok else 'NOT met'}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
