"""Engine speed on a CUDA GPU: splitserve against Hugging Face transformers on the same card.

    python benchmarks/engine_cuda.py [--models smollm2-135m-shape,llama-0.85b] [--rounds 3] [--json OUT]

The engine_speed workloads (engine_workload.py: batch-1 decode of 128 tokens after a 128-token
prompt, 32 concurrent requests, one 1024-token prefill), bf16, on random-weight models with the
demo model's shapes and the 0.85B benchmark shapes (make_random_model.py; the demo wheel is too
big to travel to a lent GPU). In the same run: the card's memory read bandwidth (a reduction over
4 GiB) and bf16 matmul TFLOP/s (8192^3), so decode is reported as a share of the bandwidth
roofline. The peer is transformers' `generate` (eager, dynamic cache) on the same weights, timed
the same way; vLLM is not installable on the lent machine (no network).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from engine_speed import decode_weight_bytes  # noqa: E402
from engine_workload import SplitserveEngine, run  # noqa: E402
from make_random_model import write_random_llama  # noqa: E402


def cuda_time(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def machine_limits() -> dict:
    import torch

    x = torch.empty(2 * 1024**3, dtype=torch.bfloat16, device="cuda").fill_(1)  # 4 GiB
    read_s = cuda_time(lambda: x.sum(dtype=torch.float32), 10)
    del x
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = cuda_time(lambda: a @ b, 10)
    return {"read_gbs": 4 * 1024**3 / read_s / 1e9, "bf16_tflops": 2 * 8192**3 / mm_s / 1e12,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


class Transformers:
    """The peer, with engine_workload's interface (generate -> tokens produced, vocab)."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        self.vocab = self.model.config.vocab_size

    def generate(self, batch: list[list[int]], max_tokens: int) -> int:
        ids = self.torch.tensor(batch, device="cuda")
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-shape,llama-0.85b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "splitserve-bench-models"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    limits = machine_limits()
    print(f"# engine_cuda {time.strftime('%Y-%m-%d %H:%M')} on {limits['gpu']}, torch {limits['torch']}: "
          f"read {limits['read_gbs']:.0f} GB/s, bf16 matmul {limits['bf16_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for model in args.models.split(","):
        path = write_random_llama(os.path.join(args.models_dir, model), preset=model)
        weight_bytes = decode_weight_bytes(path)
        results = {}
        for name, make in (("splitserve", lambda: SplitserveEngine(path, None, device="cuda")),
                           ("transformers", lambda: Transformers(path))):
            t0 = time.perf_counter()
            engine = make()
            load_s = time.perf_counter() - t0
            run(engine, "warmup", 0)
            for workload in ("decode_b1", "throughput_32", "prefill_1024"):
                vals = [run(engine, workload, seed)["tok_s"] for seed in range(1, args.rounds + 1)]
                results[(name, workload)] = statistics.median(vals)
            results[(name, "load_s")] = load_s
            del engine
            torch.cuda.empty_cache()
        for workload in ("decode_b1", "throughput_32", "prefill_1024"):
            ours, peer = results[("splitserve", workload)], results[("transformers", workload)]
            row = {"model": model, "workload": workload, "splitserve_tok_s": ours, "transformers_tok_s": peer,
                   "ratio": ours / peer}
            if workload == "decode_b1":
                row["roofline_tok_s"] = limits["read_gbs"] * 1e9 / weight_bytes
                row["pct_roofline"] = 100 * ours / row["roofline_tok_s"]
            rows.append(row)
            extra = f"  {row['pct_roofline']:.1f}% of the {row['roofline_tok_s']:.0f} tok/s roofline" if "pct_roofline" in row else ""
            print(f"{model:20s} {workload:14s} splitserve {ours:9.1f} tok/s  transformers {peer:9.1f} tok/s  "
                  f"{ours / peer:5.2f}x{extra}", flush=True)
        print(f"{model:20s} load s         splitserve {results[('splitserve', 'load_s')]:.1f}  "
              f"transformers {results[('transformers', 'load_s')]:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"limits": limits, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
