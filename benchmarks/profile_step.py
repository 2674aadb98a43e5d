"""Where a batch-1 decode step's time goes: torch.profiler over engine steps.

    python benchmarks/profile_step.py [--model PATH|demo] [--device cpu|cuda] [--steps 32]

Prints the step's wall time, the device-busy time per step (CUDA kernels), the number of kernel
launches per step and the top operators by host time: on a GPU, a step far slower than its
kernels is host-bound (Python, launches, synchronisations), which CUDA graphs would remove.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=2048,
                                    enable_prefix_caching=False, kv_cache_memory_gb=2))
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    engine.add_request("p", list(range(100, 228)), params)
    for _ in range(8):  # prefill and warm-up
        engine.step()
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            engine.step()
    engine.abort_request("p")
    events = prof.key_averages()
    print(f"decode step, batch 1, unprofiled: {plain_ms:.2f} ms ({1e3 / plain_ms:.1f} tok/s)")
    if cuda:
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy_ms = sum(e.device_time for e in kernels) / 1e3 / args.steps
        print(f"GPU kernel time per step: {busy_ms:.2f} ms ({100 * busy_ms / plain_ms:.0f}% of the step); "
              f"{len(kernels) / args.steps:.0f} kernels per step")
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
        print(f"launches per step: {launches / args.steps:.0f}; synchronising copies per step: {syncs / args.steps:.1f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
