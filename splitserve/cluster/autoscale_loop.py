"""The autoscaler in the gateway: every interval, measure -> predict -> decide -> ask the pools.

`Autoscaler.decide(now)` is synchronous and needs nothing but its parts (a LoadMonitor, a
Predictor, the pure AutoscalePolicy and a `Pools` adapter), so the tests drive it on a fake clock.
`run(...)` is the gateway's asyncio task: the simulator runs in a thread (bounded by the
predictor's budget) so the event loop keeps serving. Every decision is logged with its reasons
and kept for GET /cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from splitserve.cluster.autoscale_policy import Action, AutoscalePolicy, Decision, Observation
from splitserve.cluster.autoscale_predictor import Predictor, SizeChoice
from splitserve.cluster.load_monitor import LoadMeasurement, LoadMonitor

log = logging.getLogger("splitserve.autoscale")


class Pools(Protocol):
    """What the autoscaler needs from the cluster."""

    def ready_sizes(self) -> tuple[int, int]:
        """Workers now taking traffic: (prefill, decode)."""

    def worker_stats(self) -> list[tuple[str, str, object]]:
        """(worker id, role, latest messages.Stats or None) of every worker."""

    async def request_sizes(self, prefill: int, decode: int) -> str | None:
        """Ask the pools to become this size. None: accepted; else why the resources were refused."""


@dataclass
class Autoscaler:
    monitor: LoadMonitor
    predictor: Predictor
    policy: AutoscalePolicy
    pools: Pools

    def __post_init__(self) -> None:
        self.decisions: deque[Decision] = deque(maxlen=10)  # the latest, whatever they did
        self.changes: deque[Decision] = deque(maxlen=50)  # the latest that asked for a new size (or were refused)
        self.last_choice: SizeChoice | None = None
        self.num_decisions = 0

    def observe(self) -> tuple[LoadMeasurement, tuple[int, int]]:
        """The window's measurement and the ready sizes (on the event loop: the monitor is not thread-safe)."""
        self.monitor.observe_workers(self.pools.worker_stats())
        return self.monitor.measure(), self.pools.ready_sizes()

    def conclude(self, now: float, m: LoadMeasurement, current: tuple[int, int], choice: SizeChoice) -> Decision:
        self.last_choice = choice
        busy = tuple(m.steps[r].busy_fraction if r in m.steps else 0.0 for r in ("prefill", "decode"))
        obs = Observation(now, current, choice, m.ttft_ms, m.tpot_ms, m.num_finished + m.num_waiting_first,
                          m.arrival_rate, busy)
        d = self.policy.step(obs)
        self._keep(d, m.arrival_rate)
        return d

    def decide(self, now: float) -> Decision:
        """One interval's measurement, prediction and decision, in this thread (the tests' fake clock)."""
        m, current = self.observe()
        return self.conclude(now, m, current, self._predict(m, current))

    def _predict(self, m: LoadMeasurement, current: tuple[int, int]) -> SizeChoice:
        cfg = self.policy.cfg
        missed = (m.ttft_ms or 0.0) > cfg.slo_ttft_ms  # then which pool to grow is the simulator's to say
        return self.predictor.choose(m, cfg.bounds, current, observed_miss=missed)

    async def apply(self, d: Decision, now: float) -> Decision:
        """Carry out a decision that changes the size; a refusal becomes the policy's next decision."""
        if d.action is Action.HOLD:
            return d
        refused = await self.pools.request_sizes(*d.target)
        if refused is None:
            return d
        r = self.policy.on_refused(now, refused)
        self._keep(r, None)
        self.changes.append(r)  # the refusal, beside the decision it answers
        return r

    def _keep(self, d: Decision, rate: float | None) -> None:
        self.num_decisions += 1
        self.decisions.append(d)
        if d.action is not Action.HOLD:
            self.changes.append(d)
        rate_s = "" if rate is None else f" at {rate:.2f} req/s"
        log.info("autoscale %s%s: %d:%d -> %d:%d; %s", d.action.value, rate_s, *d.current, *d.target,
                 "; ".join(d.reasons))

    def info(self) -> dict:
        """For GET /cluster: the targets, the last decisions, the predictions for current and chosen sizes."""
        p = self.policy
        c = self.last_choice
        m = self.monitor.measure()
        return {
            "state": p.state.value, "target": None if p.target is None else {"prefill": p.target[0], "decode": p.target[1]},
            "slo": {"ttft_ms": p.cfg.slo_ttft_ms, "tpot_ms": p.cfg.slo_tpot_ms, "percentile": 90},
            "bounds": {"prefill": [p.cfg.bounds.min_prefill, p.cfg.bounds.max_prefill],
                       "decode": [p.cfg.bounds.min_decode, p.cfg.bounds.max_decode]},
            "interval_s": p.cfg.interval_s, "intervals": self.num_decisions,
            "measured": {"arrival_rate": round(m.arrival_rate, 3), "finished": m.num_finished,
                         "waiting_first_token": m.num_waiting_first,
                         "prefix_hit_rate": round(m.prefix_hit_rate, 3), "ttft_ms": m.ttft_ms, "tpot_ms": m.tpot_ms,
                         "window_s": round(m.window_s, 1),
                         "step_times": {role: {"decode_step_ms": round(s.decode_step_s * 1000, 3),
                                               "decode_batch": round(s.decode_batch, 2),
                                               "prefill_step_ms": round(s.prefill_step_s * 1000, 3),
                                               "busy": round(s.busy_fraction, 3)} for role, s in m.steps.items()}},
            "predicted_current": c.current.to_json() if c and c.current else None,
            "predicted_target": c.chosen.to_json() if c and c.chosen else None,
            "predictor": None if c is None else {"simulated_runs": c.evaluated, "wall_s": round(c.wall_s, 3),
                                                 "note": c.note},
            "decisions": [d.to_json() for d in self.decisions],
            "changes": [d.to_json() for d in self.changes],
        }

    async def run(self, clock=time.monotonic) -> None:
        """The gateway's task: one decision per interval until cancelled; an error is logged, never fatal."""
        interval = self.policy.cfg.interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                m, current = self.observe()
                # the simulator off the event loop; it reads only the frozen measurement
                choice = await asyncio.to_thread(self._predict, m, current)
                await self.apply(self.conclude(clock(), m, current, choice), clock())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("autoscaler interval failed; trying again next interval")
