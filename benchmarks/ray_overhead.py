"""What placing workers with Ray costs at low load: TTFT and TPOT of the same disaggregated pair
(1 prefill + 1 decode worker, one thread each) started locally and as Ray actors, both servers
up at once and measured in interleaved rounds (the order alternates), one request at a time.

    python benchmarks/ray_overhead.py [--model demo] [--rounds 6] [--requests 4] [--ray auto|HOST:PORT]

With `--ray auto` (the default) the Ray server starts a local Ray in a private temp dir and stops
it on exit. On one host the KV still moves through shared memory; what Ray changes is the
worker's parent (an actor), its control socket (TCP on the node's address instead of a Unix
socket) and the gateway polling each actor's run call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.stream_timing import token_stamps  # noqa: E402
from splitserve.testing import ServerProcess  # noqa: E402

PROMPT = ("The history of the lighthouse keepers on the northern coast is long and full of storms. " * 14).strip()
PAIR = ["--disaggregated", "--prefill-threads", "1", "--decode-threads", "1", "--max-model-len", "2048",
        "--log-level", "WARNING"]


_SEQ = iter(range(1 << 30))


async def one(http: httpx.AsyncClient, base_url: str, max_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds for one greedy streamed completion (a fresh prompt: no prefix hit)."""
    body = {"prompt": f"Log {next(_SEQ)}. {PROMPT}", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = await token_stamps(http, base_url, body)
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


async def measure(servers: dict[str, ServerProcess], rounds: int, requests: int, max_tokens: int) -> dict:
    samples = {name: {"ttft": [], "tpot": []} for name in servers}
    names = list(servers)
    async with httpx.AsyncClient(timeout=300) as http:
        for name in names:  # warm-up: kernels, caches, the first connection
            await one(http, servers[name].base_url, 8)
        for r in range(rounds):
            for _ in range(requests):  # alternate request by request: the host's load drifts
                for name in (names if r % 2 == 0 else names[::-1]):
                    ttft, tpot = await one(http, servers[name].base_url, max_tokens)
                    samples[name]["ttft"].append(ttft)
                    samples[name]["tpot"].append(tpot)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per server per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ray", default="auto")
    ap.add_argument("--logs", default=None, metavar="DIR", help="keep the two servers' logs here")
    args = ap.parse_args()
    ray_tmp = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    servers = {}
    try:
        logs = {n: os.path.join(args.logs, f"{n}.log") if args.logs else None for n in ("local", "ray")}
        servers["local"] = ServerProcess("--model", args.model, *PAIR, startup_timeout=600,
                                         log_path=logs["local"]).start()
        servers["ray"] = ServerProcess("--model", args.model, *PAIR, "--ray", args.ray, env=env,
                                       startup_timeout=600, log_path=logs["ray"]).start()
        samples = asyncio.run(measure(servers, args.rounds, args.requests, args.max_tokens))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    # Paired: each Ray request against the local one measured next to it.
    pairs = {k: statistics.median(r / x - 1 for r, x in zip(samples["ray"][k], samples["local"][k]))
             for k in ("ttft", "tpot")}
    n = len(samples["local"]["ttft"])
    print(f"model {args.model}, {n} requests per server ({args.rounds} interleaved rounds), "
          f"~{len(PROMPT.split())}-word prompts (no prefix-cache hits), {args.max_tokens} output tokens, one at a time")
    print(f"{'':8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for name, m in med.items():
        print(f"{name:8} {m['ttft'] * 1e3:12.1f} {m['tpot'] * 1e3:12.2f}")
    for key in ("ttft", "tpot"):
        print(f"Ray overhead, {key.upper()}: {(med['ray'][key] / med['local'][key] - 1) * 100:+.1f}% (p50 vs p50), "
              f"{pairs[key] * 100:+.1f}% (median of adjacent pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
