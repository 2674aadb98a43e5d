"""The autoscaler's answer to a rate step, live: seconds until the SLOs hold again, and a plot.

Starts a local `splitserve serve --disaggregated --autoscale` (1 prefill + 1 decode worker),
sends Poisson arrivals at `--low-rate` for `--low-s` seconds, then at `--high-rate` for
`--high-s`, and polls GET /cluster for the ready pool sizes and the autoscaler's decisions.
Prints, over a sliding window of requests by send time: when the SLO percentile first broke after
the step, when the autoscaler first asked for more workers, when they were ready, and the
seconds from the step until the SLOs held again (for the rest of the run). With `--static` the
same load runs against the same server without --autoscale, for comparison. Writes a PNG of the
rate, P:D and TTFT/TPOT over time.

    python benchmarks/autoscale_step.py --png docs/img/autoscale_step.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from splitserve.bench.client import OpenAIClient  # noqa: E402
from splitserve.bench.schema import RequestRecord  # noqa: E402
from splitserve.cluster.load_monitor import SLO_PERCENTILE, percentile  # noqa: E402
from splitserve.testing import ServerProcess  # noqa: E402

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="`tiny` (a random few-MB Llama written to /tmp; see below), "
                    "`demo`, or a model path")
    ap.add_argument("--max-num-seqs", type=int, default=4, help="running requests per worker: with the tiny "
                    "model the decode pool is bound by these seats, not by this shared 2-core machine's CPU")
    ap.add_argument("--low-rate", type=float, default=0.4)
    ap.add_argument("--high-rate", type=float, default=1.8)
    ap.add_argument("--low-s", type=float, default=40.0)
    ap.add_argument("--high-s", type=float, default=150.0)
    ap.add_argument("--prompt-words", type=int, default=400, help="words per prompt (about a token each)")
    ap.add_argument("--output-len", type=int, default=12)
    ap.add_argument("--slo-ttft-ms", type=float, default=1500.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=150.0)
    ap.add_argument("--max-prefill", type=int, default=3)
    ap.add_argument("--max-decode", type=int, default=2)
    ap.add_argument("--interval-s", type=float, default=4.0)
    ap.add_argument("--window-s", type=float, default=12.0, help="the server's measuring window and ours")
    ap.add_argument("--static", action="store_true", help="also run the same load without --autoscale")
    ap.add_argument("--static-only", default=None, metavar="P:D",
                    help="only run the load against a fixed P:D without --autoscale (to choose the rates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default="docs/img/autoscale_step.png")
    ap.add_argument("--json", default=None, help="write the raw series here")
    return ap.parse_args()


def prompt(rng: random.Random, i: int, words: int) -> str:
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))  # unique: no prefix hits


async def send_load(base_url: str, args, t0: float) -> list[tuple[float, RequestRecord]]:
    """Open-loop Poisson arrivals: low rate, then high rate. Returns (send time, record) pairs."""
    rng = random.Random(args.seed)
    client = OpenAIClient(base_url, model=None, endpoint="completions", timeout_s=600)
    out: list[tuple[float, RequestRecord]] = []
    tasks = []
    end = args.low_s + args.high_s
    t, i = 0.0, 0
    while True:
        rate = args.low_rate if t < args.low_s else args.high_rate
        t += -math.log(1.0 - rng.random()) / rate
        if t >= end:
            break
        await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
        rec = RequestRecord(request_id=i, start_s=t)
        out.append((time.monotonic() - t0, rec))
        tasks.append(asyncio.create_task(client.request(rec, prompt(rng, i, args.prompt_words), args.output_len)))
        i += 1
    await asyncio.gather(*tasks)
    await client.close()
    return out


async def poll_cluster(server: ServerProcess, t0: float, stop: asyncio.Event) -> list[dict]:
    series = []
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            try:
                info = (await http.get(server.base_url + "/cluster", headers=server.headers)).json()
            except httpx.TransportError:  # a kept-alive connection closed under us on a loaded host: ask again
                await asyncio.sleep(0.1)
                continue
            ready = [w["role"] for w in info["workers"] if w["state"] == "ready"]
            auto = info.get("autoscale") or {}
            series.append({"t": time.monotonic() - t0, "prefill": ready.count("prefill"),
                           "decode": ready.count("decode"), "target": auto.get("target")})
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
    return series


def windows(sent: list[tuple[float, RequestRecord]], window: float, end: float) -> list[dict]:
    """Per second: rate sent and the SLO percentile of TTFT/TPOT over requests sent in the last `window` s."""
    rows = []
    for s in range(int(window), int(end) + 1):
        recs = [r for t, r in sent if s - window <= t < s]
        ok = [r for r in recs if r.ok]
        rows.append({"t": s, "rate": len(recs) / window, "failed": len(recs) - len(ok),
                     "ttft_ms": percentile((r.ttft_ms for r in ok if r.ttft_ms is not None), SLO_PERCENTILE),
                     "tpot_ms": percentile((r.tpot_ms for r in ok if r.tpot_ms is not None), SLO_PERCENTILE)})
    return rows


def holds(row: dict, args) -> bool:
    return (not row["failed"] and row["ttft_ms"] is not None and row["ttft_ms"] <= args.slo_ttft_ms
            and (row["tpot_ms"] or 0.0) <= args.slo_tpot_ms)


def summarize(rows: list[dict], series: list[dict], decisions: list[dict], t0: float, args) -> dict:
    """Decision times are the server's time.monotonic(), the same clock as ours (one host)."""
    step = args.low_s
    after = [r for r in rows if r["t"] >= step]
    broke = next((r["t"] for r in after if not holds(r, args)), None)
    # the SLOs hold again: from this second on, every window to the end of the run holds
    recovered = None
    for r in reversed(after):
        if not holds(r, args):
            break
        recovered = r["t"]
    asked = next((d["at"] - t0 for d in decisions if d["at"] - t0 >= step and d["action"] in ("scale_up", "scale")),
                 None)
    start = series[0] if series else {"prefill": 0, "decode": 0}
    grown = next((s["t"] for s in series if s["t"] >= step
                  and s["prefill"] + s["decode"] > start["prefill"] + start["decode"]), None)
    last = series[-1] if series else start
    return {"step_at_s": step, "slo_first_missed_s": broke, "first_scale_up_seen_s": asked,
            "more_workers_ready_s": grown, "slos_hold_again_s": recovered,
            "seconds_until_slos_hold": None if recovered is None else max(0.0, recovered - step),
            "final_sizes": f"{last['prefill']}:{last['decode']}"}


def plot(path: str, runs: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_n, ax_t, ax_p) = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    for name, (rows, series) in runs.items():
        ts = [r["t"] for r in rows]
        style = "-" if name == "autoscale" else "--"
        if name == list(runs)[0]:
            ax_r.plot(ts, [r["rate"] for r in rows], "k-", label=f"sent ({args.window_s:g} s window)")
            ax_n.step([s["t"] for s in series], [s["prefill"] for s in series], "b-", where="post", label="prefill ready")
            ax_n.step([s["t"] for s in series], [s["decode"] for s in series], "g-", where="post", label="decode ready")
        ax_t.plot(ts, [r["ttft_ms"] for r in rows], style, color="tab:red", label=f"TTFT p90 ({name})")
        ax_p.plot(ts, [r["tpot_ms"] for r in rows], style, color="tab:purple", label=f"TPOT p90 ({name})")
    ax_t.axhline(args.slo_ttft_ms, color="gray", lw=0.8, ls=":", label="SLO")
    ax_p.axhline(args.slo_tpot_ms, color="gray", lw=0.8, ls=":", label="SLO")
    for ax in (ax_r, ax_n, ax_t, ax_p):
        ax.axvline(args.low_s, color="orange", lw=0.8)
        ax.legend(loc="upper left", fontsize=7)
    ax_r.set_ylabel("req/s")
    ax_n.set_ylabel("workers")
    ax_t.set_ylabel("ms")
    ax_t.set_yscale("log")
    ax_p.set_ylabel("ms")
    ax_p.set_xlabel("seconds (rate step at the orange line)")
    fig.suptitle(f"splitserve --autoscale: rate step {args.low_rate:g} -> {args.high_rate:g} req/s, "
                 f"{args.prompt_words}-word prompts, {args.output_len} tokens out")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)


def model_path(name: str) -> str:
    if name != "tiny":
        return name
    from make_random_model import write_random_llama

    return write_random_llama("/tmp/splitserve-autoscale-tiny", preset="tiny", dtype="float32")


def run_one(args, autoscale: bool, sizes: tuple[int, int] = (1, 1)) -> tuple[list[dict], list[dict], dict]:
    common = ["--model", model_path(args.model), "--threads", "1", "--max-model-len", "1024", "--disaggregated",
              "--max-num-seqs", str(args.max_num_seqs),
              "--prefill-workers", str(sizes[0]), "--decode-workers", str(sizes[1])]
    extra = (["--autoscale", "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
              "--max-prefill", str(args.max_prefill), "--max-decode", str(args.max_decode),
              "--autoscale-interval-s", str(args.interval_s), "--autoscale-window-s", str(args.window_s)]
             if autoscale else [])
    with ServerProcess(*common, *extra, startup_timeout=300) as server:
        async def both():
            t0 = time.monotonic()
            stop = asyncio.Event()
            poller = asyncio.create_task(poll_cluster(server, t0, stop))
            sent = await send_load(server.base_url, args, t0)
            stop.set()
            return sent, await poller, t0

        sent, series, t0 = asyncio.run(both())
        info = server.wait_idle(timeout=60)  # the leak check
    rows = windows(sent, args.window_s, args.low_s + args.high_s)
    decisions = (info.get("autoscale") or {}).get("changes", [])
    summary = summarize(rows, series, decisions, t0, args)
    summary["requests"] = len(sent)
    summary["failed"] = sum(1 for _, r in sent if not r.ok)
    if autoscale:
        summary["decisions"] = [dict(d, at=d["at"] - t0) for d in decisions]
    return rows, series, summary


def main() -> None:
    args = parse()
    runs, out = {}, {}
    plan = [("autoscale", True, (1, 1))] + ([("static", False, (1, 1))] if args.static else [])
    if args.static_only:
        plan = [(f"static {args.static_only}", False, tuple(int(x) for x in args.static_only.split(":")))]
    for name, auto, sizes in plan:
        rows, series, summary = run_one(args, auto, sizes)
        runs[name] = (rows, series)
        out[name] = summary
        print(f"== {name}: " + json.dumps({k: v for k, v in summary.items() if k != "decisions"}))
        for d in summary.get("decisions", []):
            print(f"   decision at {d['at']:.1f}: {d['action']} {d['current']} -> {d['target']}: "
                  + "; ".join(d["reasons"]))
    plot(args.png, runs, args)
    print(f"plot: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": out,
                       "series": {k: {"windows": v[0], "cluster": v[1]} for k, v in runs.items()}}, f)


if __name__ == "__main__":
    main()
