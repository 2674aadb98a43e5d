"""Cross-check `splitserve bench` against vLLM's own client (`vllm bench serve`).

Both clients run the same workload against the same server: random-ish prompts of a fixed
input length, fixed output length with ignore_eos, a fixed number of requests at a fixed
concurrency, on the /v1/completions endpoint. Rounds alternate the order (vLLM
first, then splitserve first, ...) after a warm-up, so drift in the server or the machine hits
both alike. With --fake the server is the scripted fake (no server-side noise at all): that
isolates the clients' measurement. Prints a
Markdown table; mean TTFT and mean TPOT should agree within 5%.

    # starts `splitserve serve --model demo` itself when --base-url is not given
    .venv/bin/python benchmarks/peers/crosscheck_vllm.py --num-requests 16 --concurrency 4 \\
        --input-len 128 --output-len 64 --rounds 2 --json crosscheck.json

Needs the vLLM venv (benchmarks/peers/setup_vllm.sh) and, for vLLM's tokenizer, transformers in
this venv: it converts the demo GGUF's tokenizer to a tokenizer.json directory once
(/work/peers/tokenizers/<name>), since vLLM's client loads a Hugging Face tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VLLM_PY = os.environ.get("VLLM_PYTHON", "/work/peers/vllm-venv/bin/python")
sys.path.insert(0, REPO)

from splitserve.testing import ServerProcess, free_port  # noqa: E402


def _wait_ready(base: str, proc: subprocess.Popen | None, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                return json.load(r)["data"][0]["id"]
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server not ready")


def _hf_tokenizer_dir(model_name: str) -> str:
    out = f"/work/peers/tokenizers/{model_name}"
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    from transformers import AutoTokenizer

    from splitserve.models.registry import demo_model_path

    path = demo_model_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    os.makedirs(out, exist_ok=True)
    tok.save_pretrained(out)
    return out


def run_vllm(base: str, model: str, tokenizer: str, a: argparse.Namespace, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "vllm.json")
        cmd = [VLLM_PY, os.path.join(HERE, "vllm_cli.py"), "bench", "serve", "--backend", "openai",
               "--base-url", base, "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
               "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len), "--ignore-eos",
               "--num-prompts", str(a.num_requests), "--max-concurrency", str(a.concurrency),
               "--request-rate", "inf", "--seed", str(seed), "--save-result", "--result-filename", out,
               "--disable-tqdm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"vllm bench failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        with open(out) as fp:
            d = json.load(fp)
    return {"client": "vllm bench serve", "completed": d["completed"], "failed": d["failed"],
            "duration_s": d["duration"], "mean_ttft_ms": d["mean_ttft_ms"], "median_ttft_ms": d["median_ttft_ms"],
            "mean_tpot_ms": d["mean_tpot_ms"], "mean_itl_ms": d["mean_itl_ms"],
            "request_throughput": d["request_throughput"], "output_throughput": d["output_throughput"],
            "total_input_tokens": d["total_input_tokens"]}


def run_splitserve(base: str, a: argparse.Namespace, seed: int, tokenizer: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ss.json")
        cmd = [sys.executable, "-m", "splitserve.cli", "bench", "--base-url", base, "--endpoint", "completions",
               "--input-len", str(a.input_len), "--output-len", str(a.output_len),
               "--num-requests", str(a.num_requests), "--concurrency", str(a.concurrency), "--seed", str(seed),
               "--tokenizer", tokenizer, "--quiet", "--output", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"splitserve bench failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        with open(out) as fp:
            s = json.load(fp)["summary"]
    return {"client": "splitserve bench", "completed": s["completed"], "failed": s["failed"],
            "duration_s": s["duration_s"], "mean_ttft_ms": s["ttft_ms"]["mean"], "median_ttft_ms": s["ttft_ms"]["p50"],
            "mean_tpot_ms": s["tpot_ms"]["mean"], "mean_itl_ms": s["itl_ms"]["mean"],
            "request_throughput": s["request_throughput"], "output_throughput": s["output_token_throughput"],
            "total_input_tokens": s["total_input_tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="an already running server (default: start the demo)")
    p.add_argument("--fake", action="store_true",
                   help="use the fake server (scripted TTFT/ITL, no server noise) instead of the demo model")
    p.add_argument("--fake-ttft-ms", type=float, default=200.0)
    p.add_argument("--fake-itl-ms", type=float, default=20.0)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    proc = server = None
    base = a.base_url
    if base is None and not a.fake:
        server = ServerProcess("--model", "demo", "--threads", str(a.server_threads), check_leaks=False).start()
        base = server.base_url
    elif base is None:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "bench", "fake-server", "--port", str(port),
                                 "--ttft-ms", str(a.fake_ttft_ms), "--itl-ms", str(a.fake_itl_ms)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        model = _wait_ready(base, proc)
        tok_dir = _hf_tokenizer_dir("SmolLM2-135M-Instruct")
        # warm-up (discarded): the first requests after start pay one-time costs
        run_splitserve(base, argparse.Namespace(**{**vars(a), "num_requests": a.concurrency}), 999, "demo")
        runs = []
        for r in range(a.rounds):
            for fn in ("vllm", "splitserve") if r % 2 == 0 else ("splitserve", "vllm"):
                res = run_vllm(base, model, tok_dir, a, seed=r) if fn == "vllm" else run_splitserve(base, a, r, "demo")
                res["round"] = r
                runs.append(res)
                print(json.dumps(res), flush=True)
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    def mean_of(client: str, key: str) -> float:
        return statistics.fmean(x[key] for x in runs if x["client"] == client)

    keys = ("mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "request_throughput", "output_throughput",
            "total_input_tokens")
    print("\n| round | client | mean TTFT (ms) | mean TPOT (ms) | output tok/s |")
    print("|---|---|---|---|---|")
    for x in runs:
        print(f"| {x['round']} | {x['client']} | {x['mean_ttft_ms']:.2f} | {x['mean_tpot_ms']:.2f} "
              f"| {x['output_throughput']:.2f} |")
    print(f"\nserver {base} ({model}); {a.num_requests} requests, concurrency {a.concurrency}, "
          f"input {a.input_len}, output {a.output_len} (ignore_eos), /v1/completions; mean of {a.rounds} rounds\n")
    print("| metric | vllm bench serve | splitserve bench | difference |")
    print("|---|---|---|---|")
    table = {}
    for k in keys:
        v, s = mean_of("vllm bench serve", k), mean_of("splitserve bench", k)
        diff = 100.0 * (s - v) / v if v else float("nan")
        table[k] = {"vllm": v, "splitserve": s, "diff_pct": diff}
        print(f"| {k} | {v:.2f} | {s:.2f} | {diff:+.1f}% |")
    if a.json:
        with open(a.json, "w") as fp:
            json.dump({"config": vars(a), "model": model, "runs": runs, "table": table}, fp, indent=1)
    ok = abs(table["mean_ttft_ms"]["diff_pct"]) <= 5 and abs(table["mean_tpot_ms"]["diff_pct"]) <= 5
    print(f"\nmean TTFT and TPOT within 5%: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
