"""xgrammar vs llguidance on our sampler's terms: which grammar library splitserve uses, measured.

    pip install --no-deps xgrammar apache-tvm-ffi   # only for this comparison; llguidance is a dependency
    python benchmarks/grammar_backends.py

For the ten schemas of benchmarks/structured_schemas.py, on the demo model's tokenizer (49,152
tokens): compile time (a fresh compiler each, no cache), the per-token cost of walking a valid
instance (compute the vocabulary mask, then accept the token) and a 32-row batch mask; the cost
of applying a 32-row bitmask to float32 logits (xgrammar's CPU kernel vs our unpackbits +
masked_fill); and what each does with a keyword it cannot enforce.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def walk_tokens(tok, instance) -> list[int]:
    return tok.encode(json.dumps(instance, separators=(", ", ": ")), add_special_tokens=False)


def bench_llguidance(tok, schemas, vocab):
    import llguidance

    from splitserve.structured.grammar import JSON_OPTIONS

    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=sorted(tok.eos_token_ids))
    executor = llguidance.LLExecutor()
    words = (vocab + 31) // 32
    out = {}
    for name, (schema, instance) in schemas.items():
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))
        mask = torch.empty(32, words, dtype=torch.int32)
        executor.unsafe_compute_mask_ptr([(m, 0)], mask.data_ptr(), words * 4, 32)
        compile_s = time.perf_counter() - t0
        ids = walk_tokens(tok, instance)
        batch = [m.deep_copy() for _ in range(32)]
        t0 = time.perf_counter()
        for t in ids:
            executor.unsafe_compute_mask_ptr([(m, 0)], mask.data_ptr(), words * 4, 32)
            assert m.consume_token(t), (name, t)
        per_token = (time.perf_counter() - t0) / len(ids)
        t0 = time.perf_counter()
        for t in ids[:10]:
            executor.unsafe_compute_mask_ptr([(b, i) for i, b in enumerate(batch)], mask.data_ptr(), words * 4, 32)
            for b in batch:
                b.consume_token(t)
        batch32 = (time.perf_counter() - t0) / 10
        out[name] = (compile_s, per_token, batch32)
    bad = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_json_schema({"type": "object", "if": {"required": ["a"]}}, defaults=JSON_OPTIONS))
    return out, f"rejected: {bad[1][0]}" if bad[0] else "accepted silently"


def bench_xgrammar(tok, schemas, vocab):
    import xgrammar as xgr

    encoded = [tok.backend.id_to_token(i) or "" for i in range(vocab)]
    info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=sorted(tok.eos_token_ids))
    out = {}
    for name, (schema, instance) in schemas.items():
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        cg = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        m = xgr.GrammarMatcher(cg)
        mask = xgr.allocate_token_bitmask(32, vocab)
        m.fill_next_token_bitmask(mask, 0)
        compile_s = time.perf_counter() - t0
        ids = walk_tokens(tok, instance)
        t0 = time.perf_counter()
        for t in ids:
            m.fill_next_token_bitmask(mask, 0)
            assert m.accept_token(t), (name, t)
        per_token = (time.perf_counter() - t0) / len(ids)
        batch = [xgr.GrammarMatcher(cg) for _ in range(32)]
        t0 = time.perf_counter()
        for t in ids[:10]:
            for i, b in enumerate(batch):
                b.fill_next_token_bitmask(mask, i)
                b.accept_token(t)
        batch32 = (time.perf_counter() - t0) / 10
        out[name] = (compile_s, per_token, batch32)
    try:
        xgr.GrammarCompiler(info).compile_json_schema(json.dumps({"type": "object", "if": {"required": ["a"]}}))
        verdict = "accepted silently"
    except Exception as exc:
        verdict = f"rejected: {exc}"
    return out, verdict


def bench_apply(vocab):
    from splitserve.engine.sampler import apply_token_bitmask

    bitmask = torch.randint(-2**31, 2**31 - 1, (32, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(32, vocab)
    rows = list(range(32))

    def timeit(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        return (time.perf_counter() - t0) / 20

    ours = timeit(lambda: apply_token_bitmask(logits.clone(), rows, bitmask))
    base = timeit(lambda: logits.clone())
    res = {"ours (unpackbits + masked_fill)": ours - base}
    try:
        import xgrammar as xgr

        res["xgrammar apply_token_bitmask_inplace (CPU)"] = timeit(
            lambda: xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)) - base
    except ImportError:
        pass
    return res


def main() -> None:
    from structured_schemas import SCHEMAS

    from splitserve.models.registry import demo_model_path
    from splitserve.models.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(demo_model_path())
    vocab = tok.vocab_size
    results = {"llguidance": bench_llguidance(tok, SCHEMAS, vocab)}
    try:
        results["xgrammar"] = bench_xgrammar(tok, SCHEMAS, vocab)
    except ImportError:
        print("xgrammar not installed: pip install --no-deps xgrammar apache-tvm-ffi")
    print(f"{'backend':<11} {'schema':<18} {'compile ms':>10} {'mask+accept us/token':>21} {'32-row mask ms':>15}")
    for backend, (rows, _) in results.items():
        for name, (c, p, b) in rows.items():
            print(f"{backend:<11} {name:<18} {c * 1e3:10.2f} {p * 1e6:21.1f} {b * 1e3:15.2f}")
        cs, ps, bs = zip(*rows.values())
        print(f"{backend:<11} {'MEDIAN':<18} {statistics.median(cs) * 1e3:10.2f} {statistics.median(ps) * 1e6:21.1f} "
              f"{statistics.median(bs) * 1e3:15.2f}")
    for backend, (_, verdict) in results.items():
        print(f"{backend}: a schema with `if` (not enforceable): {verdict}")
    for name, s in bench_apply(vocab).items():
        print(f"apply a 32 x {vocab} bitmask, {name}: {s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
