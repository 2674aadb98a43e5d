"""Elastic pools, timed: scale-up (the scale request to the first token the new worker serves) and
drain (the drain request to the worker gone from the cluster), on local processes or Ray actors.

    python benchmarks/elastic.py [--model demo] [--launcher local|ray] [--repeats 3]

Each repeat on a 1 prefill + 1 decode server (one thread per worker):
  1. scale-up: a long stream keeps decode worker A busy; POST /cluster/scale {"decode": 2}; once
     the new worker B is ready a request is sent, which the router puts on idle B; timed to its
     first token (checked: B's decode steps grew). Split into start-to-ready and ready-to-token.
  2. drain, idle: B drained with nothing on it.
  3. drain, in flight, long deadline: two 256-token streams, one on each decode worker; one
     worker is drained: the drain lasts until its stream ends there and the worker exits.
  4. drain, deadline 0: the same, but the drained worker's stream moves at once to the other
     worker (re-placed with its streamed tokens); timed to the worker's exit, and the largest gap
     between tokens of either stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

IN_FLIGHT_TOKENS = 256
PROMPT = "Write a long story about a lighthouse keeper and the ships that pass in the night."


async def stream(http, base_url: str, max_tokens: int, stamps: list | None = None) -> int:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return len(await token_stamps(http, base_url, body, stamps))


async def cluster(http, base_url: str) -> dict:
    return (await http.get(base_url + "/cluster")).json()


async def decoders(http, base_url: str) -> dict:
    return {w["id"]: w for w in (await cluster(http, base_url))["workers"] if w["role"] == "decode"}


async def until(pred, step: float = 0.02, timeout: float = 600.0):
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        got = await pred()
        if got:
            return got
        await asyncio.sleep(step)
    raise TimeoutError


async def scale_up(http, url: str) -> tuple[str, float, float]:
    busy = asyncio.create_task(stream(http, url, 400))
    await until(lambda: _any_running(http, url))
    t0 = time.perf_counter()
    r = await http.post(url + "/cluster/scale", json={"decode": 2})
    [new] = r.json()["started"]
    await until(lambda: _state_is(http, url, new, "ready"))
    t_ready = time.perf_counter()
    before = (await decoders(http, url))[new]["load"]
    stamps: list[float] = []
    await stream(http, url, 8, stamps)
    await until(lambda: _steps_grew(http, url, new, before))  # the new worker served it
    busy.cancel()
    await asyncio.gather(busy, return_exceptions=True)
    await until(lambda: _idle(http, url))
    return new, t_ready - t0, stamps[0] - t0


async def _any_running(http, url):
    return any(w["load"] and w["load"]["num_running"] for w in (await decoders(http, url)).values())


async def _state_is(http, url, wid, state):
    w = (await decoders(http, url)).get(wid)
    return w is not None and w["state"] == state


async def _steps_grew(http, url, wid, before):
    load = (await decoders(http, url))[wid]["load"]
    return load is not None and (before is None or load["num_steps"] > before["num_steps"])


async def _idle(http, url):
    return all(w["load"] and not w["load"]["num_running"] for w in (await decoders(http, url)).values())


async def drain(http, url: str, wid: str, deadline_s: float) -> float:
    t0 = time.perf_counter()
    r = await http.post(f"{url}/cluster/workers/{wid}/drain", json={"deadline_s": deadline_s})
    r.raise_for_status()
    await until(lambda: _gone(http, url, wid))
    return time.perf_counter() - t0


async def _gone(http, url, wid):
    return wid not in await decoders(http, url)


async def drain_in_flight(http, url: str, deadline_s: float) -> tuple[float, float, float]:
    """(drain seconds, seconds from the drain to the last stream's end, the largest token gap).
    Two streams, one per decode worker, so the drained worker surely holds one."""
    await http.post(url + "/cluster/scale", json={"decode": 2})
    await until(lambda: _all_ready(http, url))
    stamps: list[list[float]] = [[], []]
    tasks = [asyncio.create_task(stream(http, url, IN_FLIGHT_TOKENS, s)) for s in stamps]
    await until(lambda: _len_at_least(min(stamps, key=len), 8))
    await until(lambda: _both_running(http, url))
    victim = sorted(await decoders(http, url))[0]
    t0 = time.perf_counter()
    if max(len(s) for s in stamps) >= IN_FLIGHT_TOKENS:
        raise RuntimeError("a stream ended before the drain began: raise IN_FLIGHT_TOKENS")
    seconds = await drain(http, url, victim, deadline_s)
    await asyncio.gather(*tasks)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return seconds, max(s[-1] for s in stamps) - t0, max(gaps)


async def _both_running(http, url):
    ws = (await decoders(http, url)).values()
    return len(ws) == 2 and all(w["load"] and w["load"]["num_running"] for w in ws)


async def _all_ready(http, url):
    ws = await decoders(http, url)
    return len(ws) == 2 and all(w["state"] == "ready" for w in ws.values())


async def _len_at_least(xs, n):
    return len(xs) >= n


async def run(url: str, repeats: int) -> dict:
    out = {k: [] for k in ("to_ready", "to_first_token", "drain_idle", "drain_inflight", "drain_inflight_to_end",
                           "drain_now", "drain_now_gap")}
    async with httpx.AsyncClient(timeout=600) as http:
        await stream(http, url, 4)
        for _ in range(repeats):
            new, to_ready, to_token = await scale_up(http, url)
            out["to_ready"].append(to_ready)
            out["to_first_token"].append(to_token)
            out["drain_idle"].append(await drain(http, url, new, 30))
            seconds, to_end, _ = await drain_in_flight(http, url, 300)
            out["drain_inflight"].append(seconds)
            out["drain_inflight_to_end"].append(to_end)
            seconds, _, gap = await drain_in_flight(http, url, 0)
            out["drain_now"].append(seconds)
            out["drain_now_gap"].append(gap)
        info = await cluster(http, url)
        out["moved"] = sum(d["moved"] for d in info["drains"])
        out["replaced"] = info["requests_replaced"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--launcher", choices=["local", "ray"], default="local")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray_tmp = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    # Half a CPU per worker in Ray's accounting: the local Ray declares this host's 2 cores, and
    # the scale-up needs room for a third worker (locally the OS simply shares the cores).
    half = json.dumps({"num_cpus": 0.5})
    extra = ["--ray", "auto", "--prefill-resources", half, "--decode-resources", half] if args.launcher == "ray" else []
    s = ServerProcess("--model", args.model, "--disaggregated", "--threads", "1", "--max-model-len", "2048",
                      "--log-level", "WARNING", *extra, env=dict(os.environ, RAY_TMPDIR=ray_tmp), startup_timeout=600)
    try:
        s.start()
        res = asyncio.run(run(s.base_url, args.repeats))
    finally:
        s.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"model {args.model}, {args.launcher} workers, {args.repeats} repeats (median, min-max), seconds")
    for key, label in (("to_ready", "scale-up: request -> new worker ready"),
                       ("to_first_token", "scale-up: request -> first token from the new worker"),
                       ("drain_idle", "drain, idle worker -> gone"),
                       ("drain_inflight", "drain, 256-token stream on it, deadline 300 s -> gone"),
                       ("drain_inflight_to_end", "  (drain -> that stream's last token)"),
                       ("drain_now", "drain, stream in flight, deadline 0 -> gone"),
                       ("drain_now_gap", "  (largest gap between the moved stream's tokens)")):
        v = res[key]
        print(f"{label:58} {statistics.median(v):7.2f}  ({min(v):.2f}-{max(v):.2f})")
    print(f"requests moved by drains: {res['moved']}, re-placed in all: {res['replaced']}, failed: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
