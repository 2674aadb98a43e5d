"""Structured outputs' cost on the demo model: decode TPOT with a JSON schema vs unconstrained at
batch 1 and 32 (interleaved rounds), and grammar compile time for ten real-world schemas, cold
and cached.

    python benchmarks/structured_speed.py [--rounds 3] [--tokens 48] [--threads 2] [--batches 1,32]
                                          [--dtype float32]

TPOT: the mean wall time of decode-only engine steps while all B requests run (the engine in
this process, seeded sampling at temperature 1, ignore_eos so every row lives for all steps).
The constrained schema requires a long array of records (minItems 50), so no row's grammar can
complete inside the measured steps: every step pays for a live mask on every row. Three variants
per round, in an order that alternates between rounds: unconstrained; the schema with each
step's mask computed on the mask thread during the forward pass (the engine's default); the
schema with the mask computed on the engine's thread before sampling (`GrammarGate.overlap`
off, the general path). Printed per variant: the median over rounds of each round's mean TPOT,
and the 20th percentile of all its steps (on a shared machine a step only gets slower from other
load, so a low percentile is the better estimate of the uncontended cost); and, timed inside
the steps, the engine thread's time to start the mask, to wait for it, and to apply it.
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


VARIANTS = ("unconstrained", "schema, overlapped mask", "schema, mask before sampling")
TIMERS = ("start", "wait", "apply")


def decode_steps(engine, prompt, batch: int, tokens: int, grammar) -> list[float]:
    """Wall times of the decode-only steps while all `batch` requests run (the first dropped)."""
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
    return times[1:]


def instrument(engine, timers: dict) -> None:
    """Time, on the engine's thread inside the real steps: starting the mask (reading new tokens,
    or the whole mask when it is not overlapped), waiting for it, applying it."""
    import splitserve.engine.sampler as sampler
    from splitserve.structured.gate import StepMask

    gate = engine.grammars
    real_constrain, real_apply, real_result = gate.constrain, sampler.apply_token_bitmask, StepMask.result

    def timed(key, fn):
        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            timers[key] += time.perf_counter() - t0
            return out
        return run

    gate.constrain = timed("start", real_constrain)
    sampler.apply_token_bitmask = timed("apply", real_apply)
    StepMask.result = timed("wait", real_result)


def measure_batch(engine, prompt, spec, batch: int, args, timers: dict) -> dict:
    """{variant: {"rounds": [mean TPOT], "steps": [step times], "timers": {key: [share per round]}}}."""
    out = {v: {"rounds": [], "steps": [], "timers": {k: [] for k in TIMERS}} for v in VARIANTS}
    for r in range(args.rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            engine.grammars.overlap = variant == VARIANTS[1]
            timers.update(dict.fromkeys(TIMERS, 0.0))
            busy = engine.decode_step_seconds
            steps = decode_steps(engine, prompt, batch, args.tokens, None if variant == VARIANTS[0] else spec)
            busy = engine.decode_step_seconds - busy
            cell = out[variant]
            cell["rounds"].append(statistics.mean(steps))
            cell["steps"] += steps
            for k in TIMERS:
                cell["timers"][k].append(timers[k] / busy)
    engine.grammars.overlap = True
    return out


def p20(values: list[float]) -> float:
    return sorted(values)[len(values) // 5]


def report_batch(batch: int, out: dict) -> None:
    base = out[VARIANTS[0]]
    f_med, f_p20 = statistics.median(base["rounds"]), p20(base["steps"])
    for variant in VARIANTS:
        cell = out[variant]
        med, low = statistics.median(cell["rounds"]), p20(cell["steps"])
        line = f"batch {batch:>3} {variant:<30} TPOT median {med * 1e3:7.2f} ms, p20 {low * 1e3:7.2f} ms"
        if variant != VARIANTS[0]:
            per_round = ", ".join(f"{100 * (c / f - 1):+.1f}" for f, c in zip(base["rounds"], cell["rounds"]))
            shares = ", ".join(f"{k} {100 * statistics.median(cell['timers'][k]):.1f}%" for k in TIMERS)
            line += (f"; overhead median {100 * (med / f_med - 1):+5.1f}% (rounds: {per_round}), "
                     f"p20 {100 * (low / f_p20 - 1):+5.1f}%; engine thread: {shares}")
        print(line, flush=True)


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
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time table")
    args = ap.parse_args()

    from splitserve.config import EngineConfig
    from splitserve.engine.engine import LLMEngine
    from splitserve.models.tokenizer import load_tokenizer
    from splitserve.structured.grammar import json_schema_spec

    engine = LLMEngine(EngineConfig(model="demo", dtype=args.dtype, threads=args.threads, device=args.device,
                                    max_model_len=1024, max_num_seqs=64, num_kv_blocks=512))
    tok = load_tokenizer(engine.model_path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "List fifty records as JSON."}]),
                        add_special_tokens=False)
    spec = json_schema_spec(LONG_SCHEMA, "schema")
    timers = dict.fromkeys(TIMERS, 0.0)
    instrument(engine, timers)
    decode_steps(engine, prompt, 2, 4, spec)  # warm-up: compile, caches, threads
    print(f"# structured_speed {time.strftime('%Y-%m-%d %H:%M')} UTC: demo model, {args.dtype}, {args.threads} "
          f"threads, {os.cpu_count()} cores, {args.tokens} tokens per request, {args.rounds} rounds, "
          f"device {args.device}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        report_batch(batch, measure_batch(engine, prompt, spec, batch, args, timers))
    if not args.no_compile:
        compile_times(engine)
    engine.close()


if __name__ == "__main__":
    main()
