"""How much does the `splitserve bench` client itself cost? (It must never be the bottleneck.)

Runs the real client code path (OpenAIClient + run_load, as `splitserve bench` does) against the
fast fake OpenAI server (splitserve.bench.fakeserver) in a separate process. The client process
is pinned to one core and the server to another, when the machine has two.

Scenario "latency": 256 concurrent streams, the server offering ~20,000 tokens/s in total
(TTFT 20 ms, ITL 12.8 ms per stream). Reports the tokens/s the client received, its CPU use,
and the TTFT it *added*: client-measured TTFT minus the server's own time from reading the
request to writing the first token (matched by X-Request-Id; perf_counter is CLOCK_MONOTONIC,
the same clock in both processes). That difference is the client's send + receive + parse
overhead plus loopback transport.

Scenario "saturation": 256 streams with ITL 4 ms (the server offers ~64,000 tokens/s, more
than one Python core of fake server can write). Shows who saturates first: if the client's CPU
stays below 100% while the server cannot keep up, the client is not the bottleneck. Its "added
TTFT" is not the client's: a saturated server reads new requests late, and that wait (before
the server's own clock starts) lands in the difference.

Both report "client tokens per CPU-second": streamed tokens over the client process's CPU time,
i.e. the token rate the client could sustain on one full core.

Targets (issue 4): >= 20,000 streamed tokens/s and 256 concurrent streams on one core, with
< 1 ms added to TTFT at p50.

    python benchmarks/bench_overhead.py                 # both scenarios, ~20 s
    python benchmarks/bench_overhead.py --requests 512 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from splitserve.bench.client import OpenAIClient  # noqa: E402
from splitserve.bench.metrics import compute_stats  # noqa: E402
from splitserve.bench.runner import run_load  # noqa: E402
from splitserve.bench.workloads import LengthDist, synthetic  # noqa: E402


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return []


def _start_server(port: int, ttft_ms: float, itl_ms: float, cpu: int | None) -> subprocess.Popen:
    code = (
        "import os,sys\n"
        f"cpu={cpu!r}\n"
        "if cpu is not None: os.sched_setaffinity(0,{cpu})\n"
        "from splitserve.bench.fakeserver import main\n"
        f"sys.exit(main(['--port','{port}','--ttft-ms','{ttft_ms}','--itl-ms','{itl_ms}']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "fake OpenAI server" not in line:
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line}")
    return proc


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _scenario(name: str, port: int, streams: int, requests: int, out_len: LengthDist, server_pid: int) -> dict:
    client = OpenAIClient(f"http://127.0.0.1:{port}", model="fake-model", endpoint="chat", timeout_s=120)
    specs = synthetic(input_len=32, output_len=out_len, num_requests=requests, seed=1)
    async with client:
        srv0 = _proc_cpu_s(server_pid)
        cpu0, t0 = time.process_time(), time.perf_counter()
        outcome = await run_load(client, specs, concurrency=streams)
        cpu1, t1 = time.process_time(), time.perf_counter()
        srv1 = _proc_cpu_s(server_pid)
    recs = outcome.records
    ok = [r for r in recs if r.ok]
    tokens = sum(r.output_tokens or 0 for r in ok)
    wall, cpu = t1 - t0, cpu1 - cpu0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/fake/timings") as resp:
        srv = json.load(resp)
    added = []
    for r in ok[streams:]:  # skip the first wave (connection set-up, synchronized start)
        t = srv.get(f"splitserve-bench-{r.request_id}")
        if t and r.ttft_ms is not None:
            added.append(r.ttft_ms - (t[1] - t[0]) * 1000.0)
    st = compute_stats(added)
    # Steady state: from 1 s in until the last request was sent (all streams busy until then);
    # after that the closed loop drains and fewer streams remain.
    w0, w1 = 1.0, max(r.start_s for r in recs)
    in_window = 0
    for r in ok:
        if r.ttft_ms is None:
            continue
        t = r.start_s + r.ttft_ms / 1000.0
        in_window += w0 <= t <= w1
        for gap in r.itl_ms:
            t += gap / 1000.0
            in_window += w0 <= t <= w1
    steady = in_window / (w1 - w0) if w1 - w0 > 0.5 else None
    return {
        "scenario": name,
        "streams": streams,
        "requests": len(recs),
        "failed": len(recs) - len(ok),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "steady_tokens_per_s": round(steady, 1) if steady else None,
        "client_cpu_s": round(cpu, 3),
        "client_cpu_util": round(cpu / wall, 3),
        "client_tokens_per_cpu_s": round(tokens / cpu, 1) if cpu > 0 else None,
        "server_cpu_util": round((srv1 - srv0) / wall, 3),
        "added_ttft_ms_p50": round(st.p50, 3) if st.p50 is not None else None,
        "added_ttft_ms_p90": round(st.p90, 3) if st.p90 is not None else None,
        "added_ttft_ms_p99": round(st.p99, 3) if st.p99 is not None else None,
        "client_ttft_ms_p50": round(compute_stats(r.ttft_ms for r in ok).p50 or 0, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--requests", type=int, default=1024, help="requests per scenario")
    p.add_argument("--target-tps", type=float, default=20_000, help="tokens/s the server offers in 'latency'")
    p.add_argument("--port", type=int, default=18931)
    p.add_argument("--scenarios", default="latency,saturation")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    cpus = _cpus()
    client_cpu = server_cpu = None
    if len(cpus) >= 2:
        client_cpu, server_cpu = cpus[0], cpus[1]
        os.sched_setaffinity(0, {client_cpu})
    out_len = LengthDist.uniform(128, 384)  # staggered ends keep the streams desynchronized
    itl_ms = 1000.0 * args.streams / args.target_tps
    results = []
    for name in args.scenarios.split(","):
        ttft, itl = (20.0, itl_ms) if name == "latency" else (20.0, 4.0)
        proc = _start_server(args.port, ttft, itl, server_cpu)
        try:
            res = asyncio.run(_scenario(name, args.port, args.streams, args.requests, out_len, proc.pid))
        finally:
            proc.terminate()
            proc.wait(10)
        res["server_ttft_ms"], res["server_itl_ms"] = ttft, round(itl, 3)
        results.append(res)
        print(json.dumps(res), flush=True)

    print()
    print(f"client pinned to CPU {client_cpu}, server to CPU {server_cpu} (of {len(cpus)})")
    print("| scenario | streams | server ITL (ms) | tokens/s received (steady) | client CPU | server CPU "
          "| client tokens per CPU-second | added TTFT p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['streams']} | {r['server_itl_ms']} | {r['steady_tokens_per_s'] or 0:,.0f} "
              f"| {100 * r['client_cpu_util']:.0f}% | {100 * r['server_cpu_util']:.0f}% "
              f"| {r['client_tokens_per_cpu_s']:,.0f} | {r['added_ttft_ms_p50']} / {r['added_ttft_ms_p99']} |")
    if args.json:
        with open(args.json, "w") as fp:
            json.dump({"client_cpu": client_cpu, "server_cpu": server_cpu, "results": results}, fp, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
