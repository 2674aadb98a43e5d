"""A burst of long prompts on a disaggregated server, with no fault: every request must be answered.

    python benchmarks/disagg_burst.py [--model demo] [--requests 160] [--words 1000] [--max-tokens 16]
                                      [--prefill-workers 1] [--decode-workers 2]

Starts `splitserve serve --disaggregated` (1 prefill + 2 decode workers by default), sends all
requests at once (each a distinct ~1,000-word prompt, so the prefix cache cannot shorten them),
and prints how many were answered 200, the other statuses, the gateway's re-placements and the
transfers the decode workers failed. The prefill worker works through the burst one request after
another, so the last ones queue for minutes: queueing must not be taken for a stalled transfer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from disagg_vs_agg import start_server, stop_server  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge every box of "
         "mixed vegetables near the old river bank").split()


def prompt(i: int, words: int) -> str:
    body = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))
    return f"Request {i}. {body}\nSummarize the text above in one sentence."


async def burst(base: str, n: int, words: int, max_tokens: int) -> tuple[collections.Counter, float]:
    statuses: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base, timeout=1800, limits=limits) as http:
        async def one(i: int) -> None:
            body = {"model": "m", "prompt": prompt(i, words), "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            try:
                r = await http.post("/v1/completions", json=body)
                statuses[r.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return statuses, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--words", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefill-workers", type=int, default=1)
    ap.add_argument("--decode-workers", type=int, default=2)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mode = ["--disaggregated", "--prefill-workers", str(args.prefill_workers), "--decode-workers",
            str(args.decode_workers), "--prefill-threads", "1", "--decode-threads", "1"]
    proc = start_server(args.model, mode, port)
    base = f"http://127.0.0.1:{port}"
    try:
        statuses, wall = asyncio.run(burst(base, args.requests, args.words, args.max_tokens))
        info = httpx.get(base + "/cluster", timeout=30).json()
    finally:
        stop_server(proc)
    decode = [w for w in info["workers"] if w["role"] == "decode"]
    failed = sum((w["transfers"] or {}).get("failed", 0) for w in decode)
    done = sum((w["transfers"] or {}).get("done", 0) for w in decode)
    gbps = [w["transfers"]["gb_per_s"] for w in decode if w["transfers"] and w["transfers"]["gb_per_s"]]
    print(f"# disaggregated burst: {args.requests} concurrent ~{args.words}-word prompts, max_tokens "
          f"{args.max_tokens}, {args.prefill_workers}P{args.decode_workers}D, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"answered {statuses.get(200, 0)}/{args.requests}; other statuses: "
          f"{dict((k, v) for k, v in statuses.items() if k != 200) or 'none'}")
    print(f"re-placements: {info['requests_replaced']} {info.get('requests_replaced_by_reason') or ''}; "
          f"KV transfers done {done}, failed {failed}; "
          f"kv GB/s per decode worker: {', '.join(f'{g:.2f}' for g in gbps) or 'n/a'}; wall {wall:.0f} s")
    return 0 if statuses.get(200, 0) == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
