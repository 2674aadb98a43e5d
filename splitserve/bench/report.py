"""Reports from results: Markdown summary and comparison tables, PNG plots (matplotlib, lazily)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from splitserve.bench.schema import BenchResult, Stats, Summary

_DIST_ROWS = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_ms"))


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _stats_row(name: str, st: Stats | None) -> str:
    if st is None or st.count == 0:
        return f"| {name} | - | - | - | - | - | - | 0 |"
    return (
        f"| {name} | {_f(st.mean)} | {_f(st.p50)} | {_f(st.p90)} | {_f(st.p95)} | {_f(st.p99)} "
        f"| {_f(st.max)} | {st.count} |"
    )


def markdown_summary(result: BenchResult) -> str:
    c, s = result.config, result.summary
    title = c.label or c.model or "endpoint"
    wl = c.workload.get("name", "?") if c.workload else "?"
    if c.rate is not None:
        load = f"rate {c.rate:g}/s ({c.arrival})"
    elif c.arrival == "trace":
        load = "trace timestamps"
    else:
        load = "closed loop" if c.concurrency else "rate inf (all at once)"
    if c.concurrency:
        load += f", concurrency {c.concurrency}"
    lines = [
        f"## {title} - {wl} @ {c.base_url or c.source}",
        "",
        f"{load}; seed {c.seed}; {c.endpoint} endpoint"
        + ("; **interrupted: partial results**" if s.interrupted else ""),
        "",
        "| | |",
        "|---|---|",
        f"| requests completed / issued | {s.completed} / {s.num_requests} ({s.failed} failed) |",
        f"| duration | {s.duration_s:.2f} s |",
        f"| request throughput | {s.request_throughput:.3f} req/s |",
        f"| input token throughput | {s.input_token_throughput:.1f} tok/s ({s.total_input_tokens} tokens) |",
        f"| output token throughput | {s.output_token_throughput:.1f} tok/s ({s.total_output_tokens} tokens) |",
    ]
    if s.goodput is not None:
        g = s.goodput
        slos = ", ".join(
            x for x in (
                f"TTFT <= {g.slo_ttft_ms:g} ms" if g.slo_ttft_ms is not None else "",
                f"TPOT <= {g.slo_tpot_ms:g} ms" if g.slo_tpot_ms is not None else "",
            ) if x
        )
        lines.append(f"| goodput ({slos}) | {g.requests_per_s:.3f} req/s, {100 * g.fraction:.1f}% of requests |")
    if s.num_chains:
        lines.append(f"| agent chains completed / started | {s.completed_chains} / {s.num_chains} |")
    if s.errors:
        lines.append("| errors | " + ", ".join(f"{k}: {v}" for k, v in s.errors.items()) + " |")
    lines += ["", "| metric (ms) | mean | p50 | p90 | p95 | p99 | max | n |", "|---|---|---|---|---|---|---|---|"]
    for name, key in _DIST_ROWS:
        lines.append(_stats_row(name, getattr(s, key)))
    if s.chain_ms is not None:
        lines.append(_stats_row("chain completion", s.chain_ms))
    return "\n".join(lines) + "\n"


def markdown_sweep(results: Sequence[BenchResult]) -> str:
    lines = [
        "| rate (req/s) | completed | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p50 | goodput req/s | goodput % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        g = s.goodput
        lines.append(
            f"| {r.config.rate if r.config.rate is not None else 'inf'} | {s.completed}/{s.num_requests} "
            f"| {s.request_throughput:.3f} | {s.output_token_throughput:.1f} | {_f(s.ttft_ms.p50)} | {_f(s.ttft_ms.p99)} "
            f"| {_f(s.tpot_ms.p50)} | {_f(s.tpot_ms.p99)} | {_f(s.e2e_ms.p50)} "
            f"| {_f(g.requests_per_s, 3) if g else '-'} | {_f(100 * g.fraction, 1) if g else '-'} |"
        )
    return "\n".join(lines) + "\n"


_COMPARE_SCALARS = (
    ("completed", "completed"),
    ("failed", "failed"),
    ("request throughput (req/s)", "request_throughput"),
    ("input tok/s", "input_token_throughput"),
    ("output tok/s", "output_token_throughput"),
)


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if a == 0:
        return "-" if b == 0 else "new"
    return f"{100.0 * (b - a) / abs(a):+.1f}%"


# What must match for two runs to be compared figure by figure (the target may differ: that is the point).
_WORKLOAD_FIELDS = ("endpoint", "workload", "num_requests", "duration_s", "rate", "arrival", "burstiness",
                    "concurrency", "seed", "ignore_eos", "slo_ttft_ms", "slo_tpot_ms")


def workload_differences(a: BenchResult, b: BenchResult) -> list[str]:
    """`field: A vs B` for every workload setting in which two runs differ (workload keys one by one)."""
    out = []
    for name in _WORKLOAD_FIELDS:
        va, vb = getattr(a.config, name), getattr(b.config, name)
        if name == "workload" and isinstance(va, dict) and isinstance(vb, dict):
            for key in sorted(set(va) | set(vb)):
                if va.get(key) != vb.get(key):
                    out.append(f"workload.{key}: {va.get(key)} vs {vb.get(key)}")
        elif va != vb:
            out.append(f"{name}: {va} vs {vb}")
    return out


def compare_markdown(a: BenchResult, b: BenchResult, name_a: str = "A", name_b: str = "B") -> str:
    """Side-by-side table of two runs with the relative change B vs A."""
    sa, sb = a.summary, b.summary
    lines = [f"| metric | {name_a} | {name_b} | change |", "|---|---|---|---|"]
    for label, key in _COMPARE_SCALARS:
        va, vb = getattr(sa, key), getattr(sb, key)
        lines.append(f"| {label} | {_f(float(va))} | {_f(float(vb))} | {_delta(va, vb)} |")
    for name, key in _DIST_ROWS + (("chain completion", "chain_ms"),):
        da, db = getattr(sa, key), getattr(sb, key)
        if da is None and db is None:
            continue
        for stat in ("mean", "p50", "p90", "p99"):
            va = getattr(da, stat) if da else None
            vb = getattr(db, stat) if db else None
            lines.append(f"| {name} {stat} (ms) | {_f(va)} | {_f(vb)} | {_delta(va, vb)} |")
    if sa.goodput or sb.goodput:
        ga = sa.goodput.requests_per_s if sa.goodput else None
        gb = sb.goodput.requests_per_s if sb.goodput else None
        lines.append(f"| goodput (req/s) | {_f(ga, 3)} | {_f(gb, 3)} | {_delta(ga, gb)} |")
    errs = sorted(set(sa.errors) | set(sb.errors))
    for e in errs:
        lines.append(f"| errors: {e} | {sa.errors.get(e, 0)} | {sb.errors.get(e, 0)} | |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_result(result: BenchResult, out_dir: str, prefix: str = "") -> list[str]:
    """cdf.png (TTFT, TPOT, ITL) and latency_over_time.png. Returns the paths written."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in result.requests if r.ok]
    series = {
        "TTFT (ms)": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "TPOT (ms)": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "ITL (ms)": [x for r in ok for x in r.itl_ms],
    }
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, vals) in zip(axes, series.items()):
        vals = sorted(vals)
        if vals:
            n = len(vals)
            ax.plot(vals, [(i + 1) / n for i in range(n)], drawstyle="steps-post")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.set_title(f"CDF of {name.split(' ')[0]} (n={len(vals)})")
    fig.suptitle(_plot_title(result))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}cdf.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter([r.start_s for r in ok], [r.e2e_ms for r in ok], s=6, label="E2E latency")
    ax.scatter([r.start_s for r in ok if r.ttft_ms is not None], [r.ttft_ms for r in ok if r.ttft_ms is not None], s=6, label="TTFT")
    bad = [r for r in result.requests if not r.ok]
    if bad:
        ax.scatter([r.start_s for r in bad], [r.e2e_ms or 0 for r in bad], s=12, marker="x", color="red", label="errors")
    ax.set_xlabel("request sent at (s since start)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Latency over time - " + _plot_title(result))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{prefix}latency_over_time.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def plot_sweep(results: Sequence[BenchResult], out_dir: str) -> list[str]:
    """sweep.png: latency percentiles and goodput against the offered rate."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    runs = [r for r in results if r.config.rate is not None]
    rates = [r.config.rate for r in runs]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for key, ax, label in (("ttft_ms", ax1, "TTFT"), ("tpot_ms", ax2, "TPOT")):
        for stat in ("p50", "p90", "p99"):
            ax.plot(rates, [getattr(getattr(r.summary, key), stat) for r in runs], marker="o", label=f"{label} {stat}")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"{label} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax3.plot(rates, [r.summary.request_throughput for r in runs], marker="o", label="throughput")
    if any(r.summary.goodput for r in runs):
        ax3.plot(rates, [r.summary.goodput.requests_per_s if r.summary.goodput else 0 for r in runs], marker="s", label="goodput")
    ax3.plot(rates, rates, linestyle=":", color="grey", label="offered")
    ax3.set_xlabel("offered rate (req/s)")
    ax3.set_ylabel("req/s")
    ax3.grid(alpha=0.3)
    ax3.legend()
    fig.suptitle("Rate sweep - " + _plot_title(results[0]) if results else "Rate sweep")
    fig.tight_layout()
    path = os.path.join(out_dir, "sweep.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _plot_title(result: BenchResult) -> str:
    c = result.config
    name = f"{c.label or c.model or ''} {c.workload.get('name', '') if c.workload else ''}".strip()
    return f"{name} @ {load_tag(result, ' ')}".strip(" @")


def load_tag(result: BenchResult, sep: str = "") -> str:
    """What distinguishes the runs of a sweep, for titles and file names: `rate 2 req/s`
    (sep " ") or `rate2` (sep ""); `rateinf`, or `concurrency8` for a closed loop."""
    c = result.config
    if c.rate is None:
        return f"concurrency{sep}{c.concurrency}" if c.concurrency else ""
    rate = "inf" if c.rate == float("inf") else f"{c.rate:g}"
    return f"rate{sep}{rate}{' req/s' if sep and rate != 'inf' else ''}"


def plot_results(results: Sequence[BenchResult], out_dir: str) -> list[str]:
    """Every run's plots (file names start with the run's rate when there are several) and the sweep plot."""
    paths: list[str] = []
    for r in results:
        paths += plot_result(r, out_dir, prefix=f"{load_tag(r)}_" if len(results) > 1 else "")
    if len(results) > 1:
        paths += plot_sweep(results, out_dir)
    return paths


def summary_line(s: Summary) -> str:
    return (
        f"{s.completed}/{s.num_requests} ok, {s.request_throughput:.2f} req/s, "
        f"TTFT p50 {_f(s.ttft_ms.p50)} ms, TPOT p50 {_f(s.tpot_ms.p50)} ms"
    )
