"""`splitserve serve`: the OpenAI-compatible server, aggregated or disaggregated."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from splitserve.cluster.autoscale_setup import add_autoscale_args
from splitserve.config import EngineConfig

if TYPE_CHECKING:
    from splitserve.api.connections import ConnectionLimits
    from splitserve.cluster.admission import AdmissionConfig

log = logging.getLogger("splitserve.serve")


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="demo", help="`demo`, a .gguf file or a Hugging Face directory")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores; "
                    "disaggregated: cores split between workers)")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="running requests per step")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per step (chunk size)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-memory-gb", type=float, default=None)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 503")
    ap.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
        kv_cache_memory_gb=args.kv_cache_memory_gb, num_kv_blocks=args.num_kv_blocks,
        max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting, seed=args.seed,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="splitserve serve", description=__doc__)
    add_engine_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"),
                    help="require `Authorization: Bearer KEY` (or set SPLITSERVE_API_KEY)")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--split-special-tokens", action="store_true",
                    help="tokenize control-token text in user messages and prompts as plain text")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template to use instead "
                    "of the model's (tools are rendered with a shipped generic template when the model's cannot)")
    ap.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral", "qwen3"],
                    help="the model's tool-call format (default: inferred from the chat template)")
    c = ap.add_argument_group("client connections")
    c.add_argument("--max-connections", type=int, default=2048,
                   help="open client connections; at the cap a new one displaces the oldest idle one")
    c.add_argument("--header-timeout", type=float, default=15.0,
                   help="seconds a connection may take to send complete request headers")
    c.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request may take to send its body")
    c.add_argument("--keep-alive-timeout", type=int, default=5, help="seconds an idle kept-alive connection stays open")
    d = ap.add_argument_group("disaggregation")
    d.add_argument("--disaggregated", action="store_true", help="separate prefill and decode worker pools")
    d.add_argument("--prefill-workers", type=int, default=1)
    d.add_argument("--decode-workers", type=int, default=1)
    d.add_argument("--prefill-threads", type=int, default=None, help="threads per prefill worker")
    d.add_argument("--decode-threads", type=int, default=None, help="threads per decode worker")
    d.add_argument("--prefill-device", default=None, help="device of the prefill workers (default: --device)")
    d.add_argument("--decode-device", default=None, help="device of the decode workers (default: --device)")
    d.add_argument("--prefill-block-size", type=int, default=None)
    d.add_argument("--decode-block-size", type=int, default=None)
    d.add_argument("--local-prefill-threshold", type=int, default=0,
                   help="uncached prompt tokens at or below which the decode worker prefills itself")
    d.add_argument("--kv-transport", default="auto", choices=["auto", "shm", "tcp"],
                   help="auto: shared memory on one host, TCP across hosts")
    d.add_argument("--gateway-queue", type=int, default=1024,
                   help="requests that may wait at the gateway for decode capacity before their prefill starts; "
                   "beyond, 503")
    d.add_argument("--no-decode-backpressure", action="store_true",
                   help="start every prefill at once, even when no decode worker has room for it yet")
    d.add_argument("--cluster-listen", default=None, metavar="HOST:PORT",
                   help="accept `splitserve worker --join` from other hosts here (needs SPLITSERVE_CLUSTER_SECRET)")
    r = ap.add_argument_group("several machines on Ray (pip install 'splitserve[ray]')")
    r.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|HOST:PORT",
                   help="run each worker as a Ray actor: auto connects to a running Ray cluster or starts a local one "
                   "(stopped with the server); HOST:PORT is the head node's address")
    r.add_argument("--prefill-resources", default=None, metavar="JSON",
                   help='Ray resources per prefill worker, e.g. \'{"num_cpus": 4, "prefill": 1}\' (default: its threads in CPUs)')
    r.add_argument("--decode-resources", default=None, metavar="JSON",
                   help="Ray resources per decode worker (aggregated: per worker)")
    r.add_argument("--ray-placement", default=None, choices=["spread", "pack"],
                   help="each pool's workers in a Ray placement group: spread (one per node) or pack (fewest nodes)")
    add_autoscale_args(ap)
    return ap.parse_args(argv)


def pools_from_args(args, base: EngineConfig):
    from splitserve.cluster.gateway import PoolSpec

    if not args.disaggregated:
        if args.prefill_device or args.decode_device:
            raise ValueError("--prefill-device / --decode-device need --disaggregated (one pool otherwise: --device)")
        return [PoolSpec("both", 1, base)]
    cores = os.cpu_count() or 2
    split = max(1, cores // max(1, args.prefill_workers + args.decode_workers))
    p_cfg = replace(base, threads=args.prefill_threads or args.threads or split,
                    block_size=args.prefill_block_size or base.block_size,
                    device=args.prefill_device or base.device)
    d_cfg = replace(base, threads=args.decode_threads or args.threads or split,
                    block_size=args.decode_block_size or base.block_size,
                    device=args.decode_device or base.device)
    # A prefill pool of 0 workers still exists: `splitserve scale --prefill N` grows it later.
    return [PoolSpec("prefill", args.prefill_workers, p_cfg), PoolSpec("decode", args.decode_workers, d_cfg)]


def ray_resources_from_args(args) -> dict[str, dict[str, float]]:
    """Per-role Ray resources, checked before anything starts (no ray import here)."""
    from splitserve.cluster.resources import parse_resources

    if not args.ray:
        if args.prefill_resources or args.decode_resources or args.ray_placement:
            raise ValueError("--prefill-resources / --decode-resources / --ray-placement place workers on Ray: add --ray")
        return {}
    decode = parse_resources(args.decode_resources, "--decode-resources")
    if not args.disaggregated:
        if args.prefill_resources:
            raise ValueError("--prefill-resources needs --disaggregated (aggregated: --decode-resources)")
        return {"both": decode}
    return {"prefill": parse_resources(args.prefill_resources, "--prefill-resources"), "decode": decode}


def admission_from_args(args) -> "AdmissionConfig":
    from splitserve.cluster.admission import AdmissionConfig

    if not args.disaggregated and (args.no_decode_backpressure or args.gateway_queue != 1024):
        raise ValueError("--gateway-queue and --no-decode-backpressure act on disaggregated pools: add --disaggregated")
    return AdmissionConfig(enabled=not args.no_decode_backpressure, max_queue=args.gateway_queue)


def connection_limits(args) -> "ConnectionLimits":
    from splitserve.api.connections import ConnectionLimits

    return ConnectionLimits(max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                            body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout)


async def start_cluster(args: argparse.Namespace, config: EngineConfig, started: dict):
    """Tokenizer, worker processes, the app: everything behind the 503 of the start-up.
    `started["cluster"]` is set as soon as the cluster exists, so a stop mid-start can end it."""
    from splitserve.api.metrics import ServerMetrics
    from splitserve.api.server import ServerState, build_app
    from splitserve.cluster.autoscale_setup import autoscale_from_args, start_autoscaler
    from splitserve.cluster.gateway import Cluster
    from splitserve.cluster.router import RouterConfig
    from splitserve.cluster.worker import SECRET_ENV
    from splitserve.models.registry import resolve_model_path, served_model_name
    from splitserve.models.tokenizer import load_tokenizer

    chat_template = open(args.chat_template).read() if args.chat_template else None  # read before workers start
    secret = os.environ.get(SECRET_ENV)
    if args.cluster_listen and not secret:
        raise ValueError(f"--cluster-listen needs the cluster secret in {SECRET_ENV}")
    if args.decode_workers < 1:
        raise ValueError("at least one decode worker is needed")
    autoscale = autoscale_from_args(args)
    path = resolve_model_path(config.model)
    pools = pools_from_args(args, config)
    admission = admission_from_args(args)
    ray_resources = ray_resources_from_args(args)
    tokenizer = await asyncio.to_thread(load_tokenizer, path)
    launcher = None
    if args.ray:
        from splitserve.cluster.ray_launcher import RayLauncher

        threads = {p.role: p.engine.threads for p in pools}
        launcher = await asyncio.to_thread(RayLauncher, args.ray, ray_resources, threads, args.ray_placement,
                                           {p.role: p.count for p in pools})
        started["launcher"] = launcher
    cluster = Cluster(pools, tokenizer.eos_token_ids,
                      router_config=RouterConfig(local_prefill_threshold=args.local_prefill_threshold),
                      kv_transport=args.kv_transport, log_level=args.log_level, join_address=args.cluster_listen,
                      secret=secret, admission=admission, launcher=launcher)
    started["cluster"] = cluster
    await cluster.start()
    if autoscale is not None:
        start_autoscaler(cluster, autoscale)
    name = args.served_model_name or served_model_name(config.model)
    aliases = frozenset({name, config.model, served_model_name(config.model)})
    seats = config.max_num_seqs + config.max_waiting
    state = ServerState(
        client=cluster, tokenizer=tokenizer, model_name=name, model_aliases=aliases,
        max_model_len=cluster.max_model_len, max_inflight=seats * max(1, args.decode_workers if args.disaggregated else 1),
        api_key=args.api_key, metrics=ServerMetrics(cluster, name), started=time.time(), seats_per_worker=seats,
        split_special_tokens=args.split_special_tokens,
        chat_template=chat_template,
        tool_call_parser=args.tool_call_parser,
    )
    return build_app(state), name, cluster


def abandon_start(cluster) -> None:
    """Stop a start-up in progress: SIGTERM the workers still starting (a kernel build they run goes
    with them; they can't read a Shutdown message yet) and release `Cluster.start`'s wait on them,
    so it ends by itself rather than being cancelled mid-wait."""
    for w in cluster.workers.values():
        if w.ready is None:
            if w.launch is not None:
                cluster.launcher.stop(w.launch)
            w.ready_event.set()


async def serve(args: argparse.Namespace) -> int:
    """Bind, answer 503 while the cluster starts, serve; on SIGINT/SIGTERM (at any point) stop
    everything in order. Returns the exit code."""
    import signal

    import uvicorn

    from splitserve.api.connections import guarded_protocol, raise_fd_limit
    from splitserve.api.startup import StartupGate, bind_listener

    t0 = time.perf_counter()
    config = engine_config_from_args(args)
    limits = connection_limits(args)
    raise_fd_limit(limits.max_connections + 1024)
    sock = bind_listener(args.host, args.port)  # PortInUse before anything slow
    gate = StartupGate()
    server = uvicorn.Server(uvicorn.Config(gate, log_level=args.log_level.lower(), timeout_graceful_shutdown=3,
                                           access_log=False, http=guarded_protocol(limits),
                                           timeout_keep_alive=limits.keep_alive_s))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Still called while uvicorn holds the signals (asyncio's wakeup fd), and again when it re-raises them.
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("listening on http://%s:%d; /health answers 503 until the model is loaded", args.host, args.port)
    started: dict = {}
    starting = asyncio.create_task(start_cluster(args, config, started))
    stopping = asyncio.create_task(stop.wait())
    code = 0
    try:
        await asyncio.wait({starting, stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is None:
            app, name, cluster = starting.result()
            gate.open(app)
            log.info("serving %s (%s) on http://%s:%d, ready in %.2fs", name, cluster.mode, args.host, args.port,
                     time.perf_counter() - t0)
            if cluster.join_address:
                log.info("workers may join at %s", cluster.join_address)
            await asyncio.wait({stopping, serving}, return_when=asyncio.FIRST_COMPLETED)
        elif starting.done():
            log.error("start-up failed: %s", starting.exception())
            code = 1
        if serving.done() and not stop.is_set():
            code = 1  # the HTTP server ended on its own: an error uvicorn has logged
    finally:
        stopping.cancel()
        cluster = started.get("cluster")
        if not starting.done():
            if cluster is None:
                starting.cancel()  # still reading the tokenizer
            else:
                abandon_start(cluster)
                await cluster.shutdown()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        if cluster is not None:
            await cluster.shutdown()  # after the HTTP server: in-flight answers finish first (no-op if done)
        elif started.get("launcher") is not None:  # connected to Ray, but the cluster never came to be
            await asyncio.to_thread(started["launcher"].close)
        sock.close()
    return code


def main(argv: list[str]) -> int:
    from splitserve.api.startup import PortInUse

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:  # before the event loop took over the signals
        return 0
    except (PortInUse, RuntimeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1


def worker_main(argv: list[str]) -> int:
    """`splitserve worker --role prefill|decode --join HOST:PORT`: join a running gateway."""
    import signal
    import socket

    from splitserve.cluster.worker import SECRET_ENV, run_worker
    from splitserve.process_signals import exit_on_sigterm
    from splitserve.models.registry import resolve_model_path
    from splitserve.models.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(prog="splitserve worker", description=worker_main.__doc__)
    add_engine_args(ap)
    ap.add_argument("--role", required=True, choices=["prefill", "decode", "both"])
    ap.add_argument("--join", required=True, metavar="HOST:PORT", help="the gateway's --cluster-listen address")
    ap.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="where peers reach this worker (use a routable address across hosts)")
    ap.add_argument("--id", default=None)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        log.error("set %s to the gateway's cluster secret", SECRET_ENV)
        return 2
    config = engine_config_from_args(args)
    eos = sorted(load_tokenizer(resolve_model_path(config.model)).eos_token_ids)
    from dataclasses import asdict

    wid = args.id or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return run_worker(wid, args.role, asdict(config), eos, f"tcp://{args.listen}", f"tcp://{args.join}",
                          f"joined-{wid}", secret, None)
    except KeyboardInterrupt:  # Ctrl-C on a worker started by hand: stop quietly
        return 0
