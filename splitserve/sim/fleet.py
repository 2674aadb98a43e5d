"""Back-of-envelope fleet arithmetic the simulator's docs and tests rely on."""

from __future__ import annotations


def systems_for_power(site_w: float, system_w: float, infra_w: float = 0.0) -> float:
    """How many systems a site's power budget feeds: site / (system + its share of supporting
    infrastructure: cooling, networking, storage, hosts)."""
    return site_w / (system_w + infra_w)


def chain_seconds(steps: int, output_tokens: int, tok_s: float, ttft_s: float = 0.0) -> float:
    """An agent chain of sequential steps, each generating `output_tokens` at `tok_s` per stream."""
    return steps * (ttft_s + output_tokens / tok_s)
