"""`splitserve bench`: load-test any OpenAI-compatible endpoint.

    splitserve bench --base-url http://127.0.0.1:8000 --num-requests 200 --rate 4 \\
        --input-len 512 --output-len 128 --slo-ttft-ms 500 --slo-tpot-ms 50 --output r.json
    splitserve bench --base-url URL --workload agent --sessions 8 --steps 10 \\
        --tool-tokens 256 --answer-tokens 150
    splitserve bench --base-url URL --workload azure-conv --duration 120 --rate 1,2,4,8 --output sweep.json
    splitserve bench compare A.json B.json
    splitserve bench plot r.json --out plots/
    splitserve bench fake-server --port 8001 --ttft-ms 50 --itl-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
from datetime import datetime, timezone
from typing import Any

WORKLOADS = ("synthetic", "shared-prefix", "agent", "trace")


def _presets() -> tuple[str, ...]:
    from splitserve.bench.workloads import PRESETS

    return tuple(PRESETS)


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help, unless the help already says its default or
    there is none worth saying (None, a flag, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve bench",
        description="Load-test an OpenAI-compatible endpoint; measure TTFT, TPOT, ITL, E2E, "
        "throughput and goodput at the client. Subcommands: `compare A.json B.json`, "
        "`plot RESULTS.json --out DIR`, `fake-server`.",
        formatter_class=DefaultsOnceFormatter,
    )
    g = p.add_argument_group("target")
    g.add_argument("--base-url", required=True, help="server root, with or without /v1")
    g.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    g.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    g.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer for prompts and counts: a path (tokenizer.json, HF dir, .gguf), "
                   "`demo`, or `approx` (default: the model's, when it is local; else approx)")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (outputs may end early)")
    g.add_argument("--no-min-tokens", dest="min_tokens", action="store_false",
                   help="do not send min_tokens = max_tokens")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="extra HTTP header")

    g = add_workload_args(p)
    g.add_argument("--output", default=None, help="write results JSON here (see docs/bench.md)")
    g.add_argument("--plot-dir", default=None, help="write PNG plots here")
    g.add_argument("--label", default=None, help="a name for this run in reports")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_workload_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Workload, load and SLO options, shared with `splitserve simulate`. Returns the
    "SLOs and output" group for the caller's output options."""
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="synthetic",
                   help=f"one of {', '.join(WORKLOADS)} or a trace preset ({', '.join(_presets())})")
    g.add_argument("--input-len", default=None,
                   help="prompt tokens: N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA[:MIN:MAX] "
                   "(default 128; shared-prefix: the per-user part; agent: the first task, "
                   "default --tool-tokens)")
    g.add_argument("--output-len", default="128", help="output tokens (same forms as --input-len)")
    g.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: system prompt tokens")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct system prompts")
    g.add_argument("--sessions", type=int, default=4, help="agent: concurrent sessions (chains)")
    g.add_argument("--steps", type=int, default=10, help="agent: steps per chain")
    g.add_argument("--tool-tokens", type=int, default=256, help="agent: tool-result tokens per step")
    g.add_argument("--answer-tokens", type=int, default=128, help="agent: answer tokens per step")
    g.add_argument("--system-len", type=int, default=0, help="agent: shared system prompt tokens")
    g.add_argument("--tool-calls", action="store_true",
                   help="agent: every step but the last is a real tool call (tool_choice required) whose result "
                        "the next step sends back as a `tool` message (chat endpoint)")
    g.add_argument("--trace", default=None, help="trace: JSONL file (timestamp, input_length or messages, output_length)")
    g.add_argument("--trace-time-scale", type=float, default=1.0, help="trace: speed-up factor")
    g.add_argument("--trace-time-unit", choices=("s", "ms"), default="s", help="trace: unit of numeric timestamps")

    g = p.add_argument_group("load")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests to send (agent: chains; default 100, or --sessions for agent)")
    g.add_argument("--duration", type=float, default=None, help="stop starting requests after S seconds")
    g.add_argument("--rate", default=None,
                   help="open-loop arrivals per second (agent: chains/s); `inf` sends all at once; "
                   "a comma list runs a sweep (default: inf; for a preset without --concurrency, "
                   "the trace's mean rate)")
    g.add_argument("--arrival", choices=("poisson", "gamma", "constant"), default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 = Poisson")
    g.add_argument("--concurrency", type=int, default=None, help="max requests (agent: sessions) in flight")
    g.add_argument("--max-requests", type=int, default=100_000, help="safety cap on requests in one run")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("SLOs and output")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--slo-itl-ms", type=float, default=None,
                   help="SLO on each request's longest gap between two tokens (a stall a mean TPOT hides)")
    return g


class UsageError(Exception):
    pass


def _parse_rates(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    rates: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            r = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise UsageError(f"bad --rate {part!r}") from None
        if not r > 0:
            raise UsageError("--rate must be > 0")
        rates.append(r)
    if not rates:
        raise UsageError("--rate is empty")
    return rates


def _make_specs(args: argparse.Namespace, rate: float | None, text: Any) -> tuple[Any, dict[str, Any], int | None]:
    """(spec iterator, workload description, concurrency) for one run."""
    from splitserve.bench import workloads as wl

    arrival = None
    if rate is not None:
        arrival = wl.Arrival(rate, args.arrival, args.burstiness)
    n = args.num_requests
    conc = args.concurrency
    dur = args.duration
    name = args.workload
    try:
        in_d, out_d = wl.parse_length(args.input_len or "128"), wl.parse_length(args.output_len)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if n is not None:
        n = min(n, args.max_requests)
    elif dur is None:
        n = args.sessions if name == "agent" else 100
    common = {"duration_s": dur, "arrival": arrival, "seed": args.seed, "text": text}
    if name == "synthetic":
        specs = wl.synthetic(input_len=in_d, output_len=out_d, num_requests=n, **common)
        info = {"name": name, "input_len": in_d.describe(), "output_len": out_d.describe()}
    elif name in wl.PRESETS:
        pr = wl.PRESETS[name]
        specs = wl.preset(name, num_requests=n, **common)
        info = {"name": name, "input_len": pr.input_len.describe(), "output_len": pr.output_len.describe(),
                "source": pr.source}
    elif name == "shared-prefix":
        specs = wl.shared_prefix(prefix_len=args.prefix_len, input_len=in_d, output_len=out_d,
                                 num_prefixes=args.num_prefixes, num_requests=n, **common)
        info = {"name": name, "prefix_len": args.prefix_len, "num_prefixes": args.num_prefixes,
                "input_len": in_d.describe(), "output_len": out_d.describe()}
    elif name == "agent":
        if args.tool_calls and args.endpoint != "chat":
            raise UsageError("agent: --tool-calls needs the chat endpoint")
        if args.input_len is not None and in_d.kind != "fixed":
            raise UsageError("agent: --input-len must be a fixed number")
        first = in_d.value if args.input_len is not None else None
        specs = wl.agent_chains(num_chains=n, steps=args.steps, tool_tokens=args.tool_tokens,
                                answer_tokens=args.answer_tokens, input_len=first,
                                system_len=args.system_len, tool_calling=args.tool_calls, **common)
        info = {"name": name, "sessions": args.sessions, "steps": args.steps, "tool_tokens": args.tool_tokens,
                "answer_tokens": args.answer_tokens, "system_len": args.system_len, "tool_calls": args.tool_calls,
                "input_len": first if first is not None else args.tool_tokens}
        if conc is None and rate is None:
            conc = args.sessions
    elif name == "trace":
        if not args.trace:
            raise UsageError("--workload trace needs --trace FILE.jsonl")
        unit = 0.001 if args.trace_time_unit == "ms" else 1.0
        try:
            with open(args.trace, encoding="utf-8") as fp:
                rows = wl.parse_trace_lines(fp, time_unit_s=unit, limit=args.max_requests)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--trace: {exc}") from None
        if not rows:
            raise UsageError("--trace: no rows")
        specs = wl.trace_replay(rows, time_scale=args.trace_time_scale, num_requests=args.num_requests,
                                duration_s=dur, closed_loop=conc is not None and args.rate is None,
                                seed=args.seed, text=text)
        info = {"name": name, "trace": os.path.basename(args.trace), "rows": len(rows),
                "time_scale": args.trace_time_scale}
    else:
        raise UsageError(f"unknown --workload {name!r}")
    return specs, info, conc


async def _run_one(args: argparse.Namespace, client: Any, rate: float | None, text: Any, stop: asyncio.Event,
                   tokenizer_name: str) -> Any:
    from splitserve import __version__
    from splitserve.bench.metrics import summarize
    from splitserve.bench.runner import LiveCounters, run_load
    from splitserve.bench.schema import BenchResult, RunConfig

    specs, info, conc = _make_specs(args, rate, text)
    if args.workload == "trace" and rate is None and conc is None:
        arrival_desc = "trace"
    else:
        arrival_desc = args.arrival if rate is not None and not math.isinf(rate) else None
    config = RunConfig(
        source="bench",
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=client.model,
        workload=info,
        num_requests=args.num_requests,
        duration_s=args.duration,
        rate=None if rate is None or math.isinf(rate) else rate,
        arrival=arrival_desc,
        burstiness=args.burstiness if arrival_desc == "gamma" else None,
        concurrency=conc,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        slo_itl_ms=args.slo_itl_ms,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout,
        tokenizer=tokenizer_name,
        label=args.label,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        splitserve_version=__version__,
    )
    counters = LiveCounters()
    total = _expected_total(args, info)
    desc = f"rate {rate:g}/s" if rate is not None and not math.isinf(rate) else (f"concurrency {conc}" if conc else "rate inf")
    progress_task = None
    if not args.quiet:
        progress_task = asyncio.create_task(_progress(counters, total, args.duration, desc, stop))
    try:
        outcome = await run_load(client, specs, concurrency=conc, duration_s=args.duration, stop=stop, counters=counters)
    finally:
        if progress_task is not None:
            progress_task.cancel()
            await asyncio.gather(progress_task, return_exceptions=True)
    if client.dropped_fields:
        config.extra["dropped_fields"] = list(client.dropped_fields)
    summary = summarize(outcome.records, duration_s=outcome.duration_s, slo_ttft_ms=args.slo_ttft_ms,
                        slo_tpot_ms=args.slo_tpot_ms, slo_itl_ms=args.slo_itl_ms, interrupted=outcome.interrupted)
    return BenchResult(config=config, summary=summary, requests=outcome.records)


def _expected_total(args: argparse.Namespace, info: dict[str, Any]) -> int | None:
    if args.duration is not None:
        return None
    n = args.num_requests
    if info["name"] == "agent":
        return (n if n is not None else args.sessions) * args.steps
    if info["name"] == "trace":
        return min(n, info["rows"]) if n is not None else info["rows"]
    return n if n is not None else 100


async def _progress(c: Any, total: int | None, duration: float | None, desc: str, stop: asyncio.Event) -> None:
    """A rich progress bar on stderr, refreshed 4 times a second (never per request)."""
    from time import perf_counter

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn() if total else
            TextColumn("{task.completed:.0f}/{task.total:.0f} s"), TimeElapsedColumn(),
            TextColumn("ok {task.fields[ok]}  err {task.fields[err]}  in flight {task.fields[inflight]}  "
                       "{task.fields[tps]:.0f} tok/s")]
    t0 = perf_counter()
    last_tokens, last_t = 0, t0
    with Progress(*cols, console=console, transient=False, auto_refresh=False) as prog:
        task = prog.add_task(desc, total=total or duration or 1, ok=0, err=0, inflight=0, tps=0.0)
        try:
            while True:
                await asyncio.sleep(0.25)
                now = perf_counter()
                tps = (c.output_tokens - last_tokens) / max(now - last_t, 1e-9)
                last_tokens, last_t = c.output_tokens, now
                done = c.completed + c.failed
                prog.update(task, completed=done if total else min(now - t0, duration or 0),
                            ok=c.completed, err=c.failed, inflight=c.started - done, tps=tps)
                prog.refresh()
        except asyncio.CancelledError:
            done = c.completed + c.failed
            prog.update(task, completed=done if total else min(perf_counter() - t0, duration or 0),
                        ok=c.completed, err=c.failed, inflight=c.started - done)
            prog.refresh()
            raise


def _load_text_source(tokenizer: Any) -> Any:
    from splitserve.bench.tokenizer import corpus_text
    from splitserve.bench.workloads import TextSource

    return TextSource(tokenizer, corpus_text())


def resolve_rates(args: argparse.Namespace) -> list[float | None]:
    """The runs' rates from --rate, the workload and --concurrency (None: closed loop)."""
    rates = _parse_rates(args.rate)
    if args.workload == "trace":
        rates = [None]  # the trace's own timestamps, or closed loop with --concurrency
    if args.workload in _presets() and args.rate is None and args.concurrency is None:
        from splitserve.bench.workloads import PRESETS

        rates = [PRESETS[args.workload].rate]
    if rates == [None] and args.concurrency is None and args.workload not in ("agent", "trace"):
        rates = [math.inf]
        if args.duration is not None:
            raise UsageError("--duration needs --rate or --concurrency")
    return rates


async def _amain(args: argparse.Namespace) -> int:
    from splitserve.bench import report
    from splitserve.bench.metrics import health_line
    from splitserve.bench.client import OpenAIClient
    from splitserve.bench.schema import write_json
    from splitserve.bench.tokenizer import load_tokenizer

    rates = resolve_rates(args)
    extra_body = None
    if args.extra_body:
        try:
            extra_body = json.loads(args.extra_body)
        except ValueError as exc:
            raise UsageError(f"--extra-body: {exc}") from None
        if not isinstance(extra_body, dict):
            raise UsageError("--extra-body must be a JSON object")
    headers = {}
    for h in args.header:
        if ":" not in h:
            raise UsageError(f"--header {h!r}: use NAME:VALUE")
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    client = OpenAIClient(args.base_url, model=args.model, endpoint=args.endpoint, api_key=api_key,
                          timeout_s=args.timeout, ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
                          extra_body=extra_body, headers=headers)
    async with client:
        if client.model is None:
            try:
                models = await client.list_models()
            except Exception as exc:  # noqa: BLE001
                print(f"splitserve bench: cannot list models at {client.root}/models ({exc}); pass --model",
                      file=sys.stderr)
                return 2
            if not models:
                print("splitserve bench: the server lists no models; pass --model", file=sys.stderr)
                return 2
            client.model = models[0]
        tokenizer = load_tokenizer(args.tokenizer or client.model)
        client.count_tokens = lambda s: len(tokenizer.encode(s))
        text = await asyncio.to_thread(_load_text_source, tokenizer)
        if not args.quiet:
            print(f"splitserve bench: {client.url} model={client.model} tokenizer={tokenizer.name}", file=sys.stderr)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        presses = 0

        def on_sigint() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                print("\nsplitserve bench: interrupted, writing partial results (Ctrl-C again to abort)",
                      file=sys.stderr)
                stop.set()
            else:
                os._exit(130)

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            loop.add_signal_handler(signal.SIGTERM, on_sigint)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals
            pass
        results = []
        try:
            for rate in rates:
                if stop.is_set():
                    break
                results.append(await _run_one(args, client, rate, text, stop, tokenizer.name))
                if len(rates) > 1 and not args.quiet:
                    print(f"rate {rate:g}: {report.summary_line(results[-1].summary)}", file=sys.stderr)
        finally:
            try:
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
            except (NotImplementedError, RuntimeError):
                pass

    if args.output:
        write_json(args.output, results[0] if len(rates) == 1 and len(results) == 1 else results)
    for r in results:
        print(report.markdown_summary(r))
        print(health_line(r.summary) + "\n")
    if len(results) > 1:
        print(report.markdown_sweep(results))
    if args.plot_dir and results:
        print("plots: " + ", ".join(report.plot_results(results, args.plot_dir)))
    if args.output:
        print(f"results: {args.output}")
    return 130 if stop.is_set() else 0


def _compare(argv: list[str]) -> int:
    from splitserve.bench.report import compare_markdown, workload_differences
    from splitserve.bench.schema import load_results

    p = argparse.ArgumentParser(prog="splitserve bench compare", description="compare two result files")
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    try:
        ra, rb = load_results(args.a), load_results(args.b)
    except (OSError, ValueError) as exc:
        print(f"splitserve bench compare: {exc}", file=sys.stderr)
        return 2
    if len(ra) != len(rb):
        print("splitserve bench compare: the files hold different numbers of runs", file=sys.stderr)
        return 2
    for x, y in zip(ra, rb):
        diffs = workload_differences(x, y)
        if diffs:
            print(f"splitserve bench compare: warning: the runs' workloads differ ({'; '.join(diffs)}); "
                  "the figures below do not compare like with like", file=sys.stderr)
        if len(ra) > 1:
            print(f"### rate {x.config.rate} vs {y.config.rate}\n")
        print(compare_markdown(x, y, os.path.basename(args.a), os.path.basename(args.b)))
    return 0


def _plot(argv: list[str]) -> int:
    from splitserve.bench import report
    from splitserve.bench.schema import load_results

    p = argparse.ArgumentParser(prog="splitserve bench plot", description="PNG plots from a result file")
    p.add_argument("results")
    p.add_argument("--out", default="plots")
    args = p.parse_args(argv)
    try:
        results = load_results(args.results)
    except (OSError, ValueError) as exc:
        print(f"splitserve bench plot: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.plot_results(results, args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return _compare(argv[1:])
    if argv and argv[0] == "plot":
        return _plot(argv[1:])
    if argv and argv[0] == "fake-server":
        from splitserve.bench.fakeserver import main as fake_main

        return fake_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_amain(args))
    except UsageError as exc:
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
