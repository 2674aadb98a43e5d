"""Structured outputs' cost on the demo model: decode TPOT with a JSON schema vs unconstrained at
batch 1 and 32 (interleaved rounds), and grammar compile time for ten real-world schemas, cold
and cached.

    python benchmarks/structured_speed.py [--rounds 3] [--tokens 48] [--threads 2] [--batches 1,32]

TPOT: the mean wall time of decode-only engine steps while all B requests run (the engine in
this process, float32, seeded sampling at temperature 1, ignore_eos so every row lives for all
steps). The constrained schema requires a long array of records (minItems 50), so no row's
grammar can complete inside the measured steps: every step pays for a live mask on every row.
Each round runs unconstrained then constrained, seconds apart. Also printed: the share of a
constrained step spent computing the batch bitmask (llguidance) and applying it (the sampler).
Compile: a fresh backend per schema (cold: build the matcher and compute its first mask) and a
cache hit (copy the cached matcher and compute its first mask); the tokenizer's one-time
conversion for llguidance is printed apart.
The same TPOT comparison over HTTP against vLLM's servers: benchmarks/peers/structured_vllm.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LONG_SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                                     "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["id", "name", "tags"], "additionalProperties": False}}}, "required": ["records"]}


def decode_tpot(engine, prompt, batch: int, tokens: int, grammar, timers) -> float:
    from splitserve.engine.sampling_params import SamplingParams

    for i in range(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", prompt, SamplingParams(
            max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True, grammar=grammar))
    times = []
    while engine.has_unfinished():
        running = engine.scheduler.num_running
        t0 = time.perf_counter()
        before = engine.decode_steps
        engine.step()
        dt = time.perf_counter() - t0
        if engine.decode_steps > before and running == batch:
            times.append(dt)
    assert engine.is_idle()
    return statistics.mean(times[1:]) if len(times) > 1 else float("nan")


def instrument(engine, timers: dict) -> None:
    """Time the bitmask computation and its application inside the real step."""
    import splitserve.engine.sampler as sampler

    gate = engine.grammars
    real_constrain, real_apply = gate.constrain, sampler.apply_token_bitmask

    def constrain(reqs):
        t0 = time.perf_counter()
        out = real_constrain(reqs)
        timers["mask"] += time.perf_counter() - t0
        return out

    def apply(*args):
        t0 = time.perf_counter()
        real_apply(*args)
        timers["apply"] += time.perf_counter() - t0

    gate.constrain = constrain
    sampler.apply_token_bitmask = apply


def compile_times(engine) -> None:
    from structured_schemas import SCHEMAS

    from splitserve.structured.grammar import json_schema_spec
    from splitserve.structured.matcher import GrammarBackend

    fresh = GrammarBackend(engine.model_path, engine.arch.vocab_size, engine.eos_token_ids)
    t0 = time.perf_counter()
    lltok = fresh.lltokenizer()
    fresh.close()
    print(f"tokenizer -> llguidance (once per process): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    print(f"{'schema':<20} {'cold ms':>8} {'cached ms':>10}")
    colds, hots = [], []
    for name, (schema, _) in SCHEMAS.items():
        spec = json_schema_spec(schema, name)
        backend = GrammarBackend(engine.model_path, engine.arch.vocab_size, engine.eos_token_ids)
        backend._lltokenizer = lltok
        t0 = time.perf_counter()
        state = backend.start(spec)
        state.wait()
        backend.fill_bitmask([state])
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = backend.start(spec)
        backend.fill_bitmask([again])
        hot = time.perf_counter() - t0
        assert backend.num_cache_hits == 1
        backend.close()
        colds.append(cold)
        hots.append(hot)
        print(f"{name:<20} {cold * 1e3:8.2f} {hot * 1e3:10.3f}")
    print(f"{'median':<20} {statistics.median(colds) * 1e3:8.2f} {statistics.median(hots) * 1e3:10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.models.tokenizer import load_tokenizer
    from splitserve.structured.grammar import json_schema_spec

    engine = LLMEngine(EngineConfig(model="demo", dtype="float32", threads=args.threads, device=args.device,
                                    max_model_len=1024, max_num_seqs=64, num_kv_blocks=512))
    tok = load_tokenizer(engine.model_path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "List fifty records as JSON."}]),
                        add_special_tokens=False)
    spec = json_schema_spec(LONG_SCHEMA, "schema")
    timers = {"mask": 0.0, "apply": 0.0}
    instrument(engine, timers)
    decode_tpot(engine, prompt, 2, 4, spec, timers)  # warm-up: compile, caches, threads
    print(f"demo model, float32, {args.threads} threads, {args.tokens} tokens per request, device {args.device}")
    for batch in (int(b) for b in args.batches.split(",")):
        free, constrained, mask_share, apply_share = [], [], [], []
        for _ in range(args.rounds):
            free.append(decode_tpot(engine, prompt, batch, args.tokens, None, timers))
            timers.update(mask=0.0, apply=0.0)
            t_before = engine.decode_step_seconds
            constrained.append(decode_tpot(engine, prompt, batch, args.tokens, spec, timers))
            busy = engine.decode_step_seconds - t_before
            mask_share.append(timers["mask"] / busy)
            apply_share.append(timers["apply"] / busy)
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"batch {batch:>3}: TPOT unconstrained {f * 1e3:7.2f} ms, JSON schema {c * 1e3:7.2f} ms, "
              f"overhead {100 * (c / f - 1):+5.1f}% (rounds: {', '.join(f'{100 * (b / a - 1):+.1f}%' for a, b in zip(free, constrained))}); "
              f"mask {100 * statistics.median(mask_share):.1f}% + apply {100 * statistics.median(apply_share):.1f}% of constrained decode time")
    compile_times(engine)
    engine.close()


if __name__ == "__main__":
    main()
