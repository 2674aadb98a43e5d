"""How much two engines on one host slow each other: the local-cpu "neighbour" factors.

A 1-thread calibration is measured with the other core idle. Live, a disaggregated pair runs a
prefill worker and a decode worker side by side; they share the last-level cache and memory
bandwidth, so a step runs longer while the other worker computes. This measures it with the real
engine in two processes, alternating alone / together:

  * decode: a decode step (batch 8, 200-token contexts) alone vs while a prefill loop runs;
  * prefill: a 256-token prefill alone vs while a decode loop runs.

The simulator stretches a local-cpu worker's step by (1 + factor) when another worker on the host
is busy as the step starts (splitserve/sim/simulator.py).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import time


def _engine(model: str, threads: int, dtype: str, prefix_caching: bool = True):
    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=model, threads=threads, dtype=dtype, max_model_len=2048,
                                  enable_prefix_caching=prefix_caching))


def _decode_load(engine):
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1_000_000, temperature=1.0, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"n{i}", list(range(100 + i, 300 + i)), params)


def _neighbor(kind: str, model: str, threads: int, dtype: str, ready, stop) -> None:
    """The other worker: keeps prefilling (kind 'prefill') or decoding until told to stop."""
    from splitserve.engine.sampling_params import SamplingParams

    engine = _engine(model, threads, dtype, prefix_caching=False)
    rng = random.Random(1)
    if kind == "decode":
        _decode_load(engine)
    params = SamplingParams(max_tokens=1, temperature=1.0, ignore_eos=True)
    ready.set()
    while not stop.is_set():
        if kind == "decode":
            engine.step()
        else:
            engine.generate([[rng.randrange(100, 20000) for _ in range(256)]], params)


def measure(model: str = "demo", threads: int = 1, dtype: str = "auto", rounds: int = 4,
            log=lambda s: None) -> dict[str, float]:
    """{"decode": slowdown, "prefill": slowdown}, each the median over `rounds` of (together / alone - 1)."""
    from splitserve.engine.sampling_params import SamplingParams

    ctx = mp.get_context("spawn")
    out: dict[str, float] = {}
    for kind, other in (("decode", "prefill"), ("prefill", "decode")):
        engine = _engine(model, threads, dtype, prefix_caching=False)
        rng = random.Random(0)
        params = SamplingParams(max_tokens=1, temperature=1.0, ignore_eos=True)
        if kind == "decode":
            _decode_load(engine)
            for _ in range(10):
                engine.step()

        def one_ms() -> float:
            if kind == "decode":
                ts = []
                for _ in range(60):
                    t = time.perf_counter()
                    engine.step()
                    ts.append(time.perf_counter() - t)
                return statistics.median(ts)
            ts = []
            for _ in range(5):
                prompt = [rng.randrange(100, 20000) for _ in range(256)]
                t = time.perf_counter()
                engine.generate([prompt], params)
                ts.append(time.perf_counter() - t)
            return statistics.median(ts)

        one_ms()
        ratios = []
        for _ in range(rounds):
            alone = one_ms()
            ready, stop = ctx.Event(), ctx.Event()
            proc = ctx.Process(target=_neighbor, args=(other, model, threads, dtype, ready, stop), daemon=True)
            proc.start()
            ready.wait(300)
            time.sleep(1.0)
            together = one_ms()
            stop.set()
            proc.join(60)
            ratios.append(together / alone - 1)
            log(f"  {kind} step: alone {alone * 1e3:.1f} ms, beside a busy {other} worker {together * 1e3:.1f} ms "
                f"({ratios[-1]:+.1%})")
        out[kind] = max(0.0, statistics.median(ratios))
    return out
