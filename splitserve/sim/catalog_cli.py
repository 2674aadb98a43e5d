"""`splitserve hardware | models`: the simulator's hardware and model catalogs, as tables or JSON."""

from __future__ import annotations

import argparse

from splitserve.sim.cli import _die

__all__ = ["hardware_main", "models_main"]


def hardware_main(argv: list[str]) -> int:
    from splitserve.sim.families import DEFAULT_STACK, FAMILIES, stacks_of
    from splitserve.sim.hardware import HARDWARE, LINKS

    p = argparse.ArgumentParser(prog="splitserve hardware", description="The simulator's hardware catalog.")
    p.add_argument("name", nargs="?", help="show one entry with its sources and its family's calibration")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        import json

        print(json.dumps({"hardware": {k: {**vars(h), "calibration": None} for k, h in HARDWARE.items()},
                          "links": {k: vars(v) for k, v in LINKS.items()},
                          "families": {k: vars(v) for k, v in FAMILIES.items()}}, indent=1, default=str))
        return 0
    if args.name:
        from splitserve.sim.hardware import get_hardware

        try:
            h = get_hardware(args.name)
        except ValueError as exc:
            return _die(str(exc), "splitserve hardware")
        print(f"{h.name}: {h.title} (family {h.family})")
        print(f"  memory {h.memory_bytes / 1e9:g} GB at {h.mem_bandwidth / 1e12:g} TB/s; peak "
              + ", ".join(f"{k} {v / 1e12:,.0f} TFLOPS" for k, v in h.flops.items()))
        print(f"  {h.power_w:,.0f} W, ${h.price_per_hour:g}/unit-hour (parameter); scale-up {h.scale_up} "
              f"({h.scale_up_size} units), scale-out {h.scale_out}")
        if h.notes:
            print(f"  {h.notes}")
        for s in h.sources:
            print(f"  source: {s}")
        for stack in stacks_of(h.family):
            f = FAMILIES[f"{h.family}/{stack}"]
            default = " (default)" if stack == DEFAULT_STACK[h.family] else ""
            print(f"  --stack {stack}{default}: {'calibrated' if f.calibrated else 'UNCALIBRATED'}; "
                  f"eff_compute {f.eff_compute:.3g}" + (f" (FP4 {f.eff_compute_fp4:.3g})" if f.eff_compute_fp4 else "")
                  + f", eff_mem {f.eff_mem:.3g}, GEMM half-efficiency at {f.gemm_half_tokens:g} tokens, "
                  f"overlap p={f.overlap:g}, layer floor {f.layer_floor_s * 1e6:.3g} us"
                  + (" x sqrt(layer size / Llama-3.1-8B's)" if f.layer_floor_ref_params else "")
                  + f", step floor {f.step_floor_s * 1e6:.3g} us"
                  + (f", {f.collective_latency_s * 1e6:.3g} us per collective message" if f.collective_latency_s
                     else "")
                  + (f", {f.tp_seq_overhead_s * 1e6:.3g} us per sequence per step at TP > 1" if f.tp_seq_overhead_s
                     else ""))
            print(f"    fitted to: {f.source}")
            if f.expected_error:
                print(f"    expected error: {f.expected_error}")
        return 0
    print("| id | hardware | family | memory GB | TB/s | BF16 TFLOPS | FP8 TFLOPS | W | $/h | scale-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for h in HARDWARE.values():
        mem = f"{h.memory_bytes / 1e9:.3g}"
        print(f"| {h.name} | {h.title} | {h.family} | {mem} | {h.mem_bandwidth / 1e12:g} | "
              f"{h.flops.get('bf16', 0) / 1e12:,.0f} | {h.flops.get('fp8', 0) / 1e12:,.0f} | {h.power_w:,.0f} | "
              f"{h.price_per_hour:g} | {h.scale_up} |")
    print("\n| family/stack | calibrated | expected error on unfitted published checks | fitted to |")
    print("|---|---|---|---|")
    for k, f in FAMILIES.items():
        print(f"| {k} | {'yes' if f.calibrated else 'NO'} | {f.expected_error or '-'} | {f.source} |")
    print("\n| link | GB/s per unit, one way | latency us |")
    print("|---|---:|---:|")
    for k in LINKS.values():
        print(f"| {k.name} | {k.bandwidth / 1e9:g} | {k.latency_s * 1e6:g} |")
    print("\n`splitserve hardware ID` shows an entry's sources and its family's stacks (--stack). "
          "Prices are parameters (--price).")
    return 0


def models_main(argv: list[str]) -> int:
    from splitserve.sim.models import MODELS

    p = argparse.ArgumentParser(prog="splitserve models", description="The simulator's model catalog.")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        import json

        print(json.dumps({k: vars(m) for k, m in MODELS.items()}, indent=1))
        return 0
    print("| id | layers | hidden | heads / KV heads | params total | active | KV per token (bf16) | context | weights |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for m in MODELS.values():
        heads = f"{m.num_heads}/{m.num_kv_heads}" if not m.is_mla else f"{m.num_heads} (MLA {m.kv_lora_rank})"
        moe = f" ({m.experts_per_token}/{m.num_experts} experts)" if m.is_moe else ""
        print(f"| {m.name} | {m.num_layers} | {m.hidden_size} | {heads} | {m.total_params / 1e9:.1f}B{moe} | "
              f"{m.active_params / 1e9:.1f}B | {m.kv_bytes_per_token('bf16') / 1024:.0f} KiB | {m.max_context} | "
              f"{m.default_dtype} |")
    print("\nAny Hugging Face config.json works too: --model path/to/config.json")
    return 0
