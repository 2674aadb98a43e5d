"""`splitserve serve --autoscale`: its flags, their checks, and wiring the autoscaler into a Cluster."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: `serve` without --autoscale never loads the simulator
    from splitserve.cluster.autoscale_loop import Autoscaler
    from splitserve.cluster.autoscale_policy import PolicyConfig


def add_autoscale_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("autoscaling (disaggregated)")
    g.add_argument("--autoscale", action="store_true",
                   help="size the prefill and decode pools to the live load: every interval the simulator, "
                   "calibrated from the workers' measured step times, picks the smallest P:D meeting the SLOs")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="autoscale: p90 time to first token to meet")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="autoscale: p90 time per output token to meet")
    g.add_argument("--min-prefill", type=int, default=1)
    g.add_argument("--max-prefill", type=int, default=None, help="default: --prefill-workers + 2")
    g.add_argument("--min-decode", type=int, default=1)
    g.add_argument("--max-decode", type=int, default=None, help="default: --decode-workers + 2")
    g.add_argument("--autoscale-interval-s", type=float, default=10.0, help="seconds between decisions")
    g.add_argument("--autoscale-window-s", type=float, default=30.0,
                   help="seconds of load each decision measures (arrival rate, lengths, step times)")


@dataclass(frozen=True)
class AutoscaleSettings:
    policy: "PolicyConfig"
    window_s: float


_AUTOSCALE_ONLY = ("slo_ttft_ms", "slo_tpot_ms", "max_prefill", "max_decode")


def autoscale_from_args(args) -> AutoscaleSettings | None:
    """The checked settings, None without --autoscale; ValueError with a clear message on misuse."""
    from splitserve.cluster.autoscale_policy import PolicyConfig
    from splitserve.cluster.autoscale_predictor import Bounds

    if not args.autoscale:
        given = [f"--{k.replace('_', '-')}" for k in _AUTOSCALE_ONLY if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only act with --autoscale")
        return None
    if not args.disaggregated:
        raise ValueError("--autoscale sizes the prefill and decode pools: it needs --disaggregated")
    if args.slo_ttft_ms is None or args.slo_tpot_ms is None:
        raise ValueError("--autoscale needs the SLOs it scales for: --slo-ttft-ms and --slo-tpot-ms")
    if args.autoscale_window_s <= 0:
        raise ValueError("--autoscale-window-s must be > 0")
    bounds = Bounds(args.min_prefill, args.max_prefill if args.max_prefill is not None else args.prefill_workers + 2,
                    args.min_decode, args.max_decode if args.max_decode is not None else args.decode_workers + 2)
    if not (bounds.min_prefill <= args.prefill_workers <= bounds.max_prefill
            and bounds.min_decode <= args.decode_workers <= bounds.max_decode):
        raise ValueError("--prefill-workers / --decode-workers must lie within the --min/--max bounds")
    interval, window = args.autoscale_interval_s, args.autoscale_window_s
    policy = PolicyConfig(args.slo_ttft_ms, args.slo_tpot_ms, bounds, interval_s=interval,
                          cooldown_s=3 * interval, miss_grace_s=window, hold_after_miss_s=2 * window)
    return AutoscaleSettings(policy, window)


class ClusterPools:
    """The autoscaler's view of a live Cluster: ready sizes, worker stats, and resizing."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def ready_sizes(self) -> tuple[int, int]:
        ws = self.cluster.workers.values()
        return (sum(w.role == "prefill" and w.state == "ready" for w in ws),
                sum(w.role == "decode" and w.state == "ready" for w in ws))

    def worker_stats(self) -> list[tuple[str, str, object]]:
        return [(w.worker_id, w.role, w.stats) for w in self.cluster.workers.values()]

    async def request_sizes(self, prefill: int, decode: int) -> str | None:
        """`Cluster.scale` (cluster/elastic.py): new workers start through the launcher, surplus ones
        drain. A pool whose new workers cannot be placed yet (the launcher asked Ray's autoscaler for
        the resources) or a refused size comes back as the reason."""
        try:
            result = self.cluster.scale(prefill=prefill, decode=decode)
        except ValueError as exc:  # ScaleError
            return str(exc)
        if result.capacity:
            return "; ".join(f"{role}: {why}" for role, why in sorted(result.capacity.items()))
        return None


def start_autoscaler(cluster, settings: AutoscaleSettings) -> "Autoscaler":
    """Attach a monitor and an autoscaler to a started Cluster and run it as one of its tasks."""
    from splitserve.cluster.autoscale_loop import Autoscaler
    from splitserve.cluster.autoscale_policy import AutoscalePolicy
    from splitserve.cluster.autoscale_predictor import Predictor, PredictorConfig, sim_config_for
    from splitserve.cluster.load_monitor import LoadMonitor

    decode = next(p.engine for p in cluster.pools if p.role == "decode")
    blocks = {role: next((w.ready.num_blocks for w in cluster.workers.values() if w.role == role and w.ready), 0)
              for role in ("prefill", "decode")}
    blocks["prefill"] = blocks["prefill"] or blocks["decode"]
    sim = sim_config_for(decode, cluster.router.config.local_prefill_threshold, cluster.queue.admission.config)
    if not decode.max_model_len:
        sim.max_model_len = cluster.max_model_len
    pc = settings.policy
    from splitserve.cluster.worker import STATS_INTERVAL_S

    predictor = Predictor.for_local_cpu(PredictorConfig(pc.slo_ttft_ms, pc.slo_tpot_ms,
                                                        report_interval_s=STATS_INTERVAL_S), sim, blocks)
    monitor = LoadMonitor(settings.window_s)
    pools = ClusterPools(cluster)
    scaler = Autoscaler(monitor, predictor, AutoscalePolicy(pc, target=pools.ready_sizes()), pools)
    cluster.monitor, cluster.autoscaler = monitor, scaler
    cluster.add_background(scaler.run())
    return scaler
