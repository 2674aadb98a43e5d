"""The sampler's cost per step: greedy rows, sampled rows, and the previous seeded-draw method.

    python benchmarks/sampler_speed.py [--vocab 49152] [--rows 1,8,32] [--repeats 50]

For R rows of random logits (the demo model's vocabulary by default), milliseconds per call of
`splitserve.engine.sampler.sample` with every row greedy and every row sampled at temperature 1,
and, as the reference measured in the same run, the method it replaced: a torch.Generator seeded
per row filling one exponential per vocabulary entry, then argmax(p / E). Torch threads as set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def previous_draw(probs, seeds: list[int]):
    """The replaced method (exponential race, one seeded generator per row), for comparison."""
    import torch

    noise = torch.empty_like(probs)
    for j, seed in enumerate(seeds):
        noise[j].exponential_(generator=torch.Generator().manual_seed(seed))
    return torch.argmax(probs / noise, dim=-1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    import torch

    from splitserve.engine.request import Request
    from splitserve.engine.sampler import sample
    from splitserve.engine.sampling_params import SamplingParams

    torch.manual_seed(0)
    print(f"# sampler_speed {time.strftime('%Y-%m-%d %H:%M')}: vocab {args.vocab}, torch threads "
          f"{torch.get_num_threads()}, ms per call")
    print("| rows | greedy | sampled (inverse CDF) | previous sampled (exponential race) | previous / now |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(rows, args.vocab) * 3

        def reqs(temperature: float) -> list[Request]:
            return [Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=8, temperature=temperature), seed=i)
                    for i in range(rows)]

        greedy, sampled = reqs(0.0), reqs(1.0)
        t_greedy = per_call_ms(lambda: sample(logits, greedy), args.repeats)
        t_now = per_call_ms(lambda: sample(logits, sampled), args.repeats)
        t_prev = per_call_ms(lambda: previous_draw(torch.softmax(logits, dim=-1), list(range(rows))), args.repeats)
        print(f"| {rows} | {t_greedy:.3f} | {t_now:.3f} | {t_prev:.3f} | {t_prev / t_now:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
