"""`splitserve serve`: the OpenAI-compatible server (aggregated: one engine worker)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from splitserve.config import EngineConfig

log = logging.getLogger("splitserve.serve")


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="demo", help="`demo`, a .gguf file or a Hugging Face directory")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all cores)")
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
    ap.add_argument("--log-level", default="INFO")
    return ap.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from splitserve.api.engine_client import EngineClient
    from splitserve.api.metrics import ServerMetrics
    from splitserve.api.server import ServerState, build_app
    from splitserve.models.registry import resolve_model_path, served_model_name
    from splitserve.models.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    config = engine_config_from_args(args)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    client = EngineClient(config, tokenizer.eos_token_ids, log_level=args.log_level)
    try:
        ready = await client.start()
    except BaseException:
        await client.shutdown()
        raise
    name = args.served_model_name or served_model_name(config.model)
    aliases = frozenset({name, config.model, served_model_name(config.model)})
    state = ServerState(
        client=client, tokenizer=tokenizer, model_name=name, model_aliases=aliases,
        max_model_len=ready.max_model_len, max_inflight=config.max_num_seqs + config.max_waiting,
        api_key=args.api_key, metrics=ServerMetrics(client, name), started=time.time(),
    )
    app = build_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=3, access_log=False))
    log.info("serving %s on http://%s:%d (ready in %.2fs)", name, args.host, args.port, time.perf_counter() - t0)
    try:
        await server.serve()
    finally:
        await client.shutdown()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return 0
