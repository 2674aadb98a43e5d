"""The autoscaler's policy: pure, on whatever clock it is given (a fake one in the tests).

Every interval it gets an `Observation` (the ready P:D now, the predictor's `SizeChoice`, the
SLO percentile the gateway observed) and returns a `Decision`: which P:D to ask for, and why.

Hysteresis, so that noise never makes it flap:
* **Up fast.** A pool whose predicted size is above its current one grows at once (at most
  `max_step_up` workers per decision); so does a pool whose SLO the gateway observed missed while
  the predictor saw no need (TTFT -> prefill, TPOT -> decode), and that size then stays a floor
  for `hold_after_miss_s`, and after that for as long as the load stays above `floor_load` x the
  arrival rate of the miss (the predictor was wrong at that load: its "smaller is enough" is not
  trusted there again).
* **Down slowly.** One pool shrinks by `max_step_down` per decision, only when, for `down_after`
  intervals in a row, the predictor wanted it smaller *and* predicted that one worker fewer still
  meets both SLOs at 25% more load than measured (`SizeChoice.shrink`), nothing was missed, and
  `cooldown_s` passed since the last change. Near a boundary the smaller size never has that
  margin, so noise in the measured load cannot make it flap.
* **Refused capacity** (the launcher could not get the resources): reported in the decision,
  retried after a backoff that doubles up to `backoff_max_s`, never in a tight loop.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from splitserve.cluster.autoscale_predictor import Bounds, Prediction, SizeChoice

MIN_OBSERVED = 5  # finished requests in the window before an observed percentile counts


class PolicyState(enum.Enum):
    STEADY = "steady"  # the ready sizes are the target
    SCALING = "scaling"  # a new target was asked for; its workers are not all ready yet
    WAITING_CAPACITY = "waiting_capacity"  # the launcher refused the resources; retrying after a backoff


class Action(enum.Enum):
    HOLD = "hold"
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    SCALE = "scale"  # one pool up, the other down


@dataclass(frozen=True)
class PolicyConfig:
    slo_ttft_ms: float
    slo_tpot_ms: float
    bounds: Bounds
    interval_s: float = 5.0
    max_step_up: int = 2
    max_step_down: int = 1
    down_after: int = 3  # intervals of sustained slack before a pool shrinks
    cooldown_s: float = 30.0  # no shrinking this soon after any change
    hold_after_miss_s: float = 60.0  # a size reached because of an observed miss is a floor this long
    floor_load: float = 0.8
    miss_grace_s: float = 30.0  # observed misses are ignored this long after a change is asked for and
    # after it is reached (the window still holds the requests that waited before)
    settle_s: float = 300.0  # a target whose workers are not ready by then is given up (and re-decided)
    backoff_s: float = 10.0  # first wait after a refused resource request
    backoff_max_s: float = 160.0

    def __post_init__(self) -> None:
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0:
            raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be > 0")
        if self.interval_s <= 0:
            raise ValueError("--autoscale-interval-s must be > 0")
        if self.max_step_up < 1 or self.max_step_down < 1 or self.down_after < 1:
            raise ValueError("autoscale steps and down_after must be >= 1")


@dataclass(frozen=True)
class Observation:
    now: float
    current: tuple[int, int]  # ready (prefill, decode) workers
    choice: SizeChoice
    observed_ttft_ms: float | None = None
    observed_tpot_ms: float | None = None
    num_observed: int = 0  # finished requests, plus those still waiting for a first token
    arrival_rate: float = 0.0
    busy: tuple[float, float] = (0.0, 0.0)  # prefill and decode workers' measured busy fractions


@dataclass(frozen=True)
class Decision:
    at: float
    state: PolicyState
    action: Action
    current: tuple[int, int]
    target: tuple[int, int]  # what the gateway asks the pools to be
    wanted: tuple[int, int] | None  # the predictor's size (within bounds), before hysteresis
    reasons: tuple[str, ...]
    predicted_current: Prediction | None = None
    predicted_target: Prediction | None = None
    retry_at: float | None = None

    def to_json(self) -> dict:
        return {"at": round(self.at, 3), "state": self.state.value, "action": self.action.value,
                "current": {"prefill": self.current[0], "decode": self.current[1]},
                "target": {"prefill": self.target[0], "decode": self.target[1]},
                "wanted": None if self.wanted is None else {"prefill": self.wanted[0], "decode": self.wanted[1]},
                "reasons": list(self.reasons),
                "predicted_current": self.predicted_current.to_json() if self.predicted_current else None,
                "predicted_target": self.predicted_target.to_json() if self.predicted_target else None,
                "retry_at": None if self.retry_at is None else round(self.retry_at, 3)}


@dataclass
class _PoolMemory:
    """Per pool: intervals of slack in a row (with the largest size wanted during them), floor after a miss."""

    slack_streak: int = 0
    streak_max: int = 0
    floor: int = 0
    floor_until: float = float("-inf")
    floor_rate: float = float("inf")  # the arrival rate when the floor was set

    def floor_at(self, now: float, rate: float, load_fraction: float) -> int:
        return self.floor if now < self.floor_until or rate >= load_fraction * self.floor_rate else 0


@dataclass
class AutoscalePolicy:
    cfg: PolicyConfig
    state: PolicyState = PolicyState.STEADY
    target: tuple[int, int] | None = None
    last_change: float = float("-inf")
    scaling_since: float = 0.0
    refusal: str | None = None
    retry_at: float | None = None
    backoff: float = 0.0
    pools: tuple[_PoolMemory, _PoolMemory] = field(default_factory=lambda: (_PoolMemory(), _PoolMemory()))
    history: deque = field(default_factory=lambda: deque(maxlen=32))

    # ---- the launcher's answers --------------------------------------------------------------
    def on_refused(self, now: float, reason: str) -> Decision:
        """The pools could not grow to the target: wait, doubling the wait each time it happens again."""
        self.backoff = min(self.backoff * 2 if self.backoff else self.cfg.backoff_s, self.cfg.backoff_max_s)
        self.state = PolicyState.WAITING_CAPACITY
        self.refusal = reason
        self.retry_at = now + self.backoff
        last = self.history[-1] if self.history else None
        cur = last.current if last else (self.target or (0, 0))
        d = Decision(now, self.state, Action.HOLD, cur, self.target or cur, last.wanted if last else None,
                     (f"resources refused: {reason}; retrying in {self.backoff:g} s",),
                     retry_at=self.retry_at)
        self.history.append(d)
        return d

    # ---- one interval --------------------------------------------------------------------------
    def step(self, obs: Observation) -> Decision:
        cfg, now, cur = self.cfg, obs.now, obs.current
        reasons: list[str] = []
        if self.target is None:
            self.target = cur
        if self.state is PolicyState.SCALING:
            if cur == self.target:
                self.state = PolicyState.STEADY
                self.backoff = 0.0
                self.last_change = now  # grace and cooldown count from when the new size serves
                reasons.append(f"reached {cur[0]}:{cur[1]}")
            elif now - self.scaling_since > cfg.settle_s:  # as good as refused: decide again, maybe withdraw
                self.state, self.retry_at = PolicyState.WAITING_CAPACITY, now
                self.refusal = f"{self.target[0]}:{self.target[1]} not ready after {cfg.settle_s:g} s"
                reasons.append(f"{self.refusal}: deciding again")
        if self.state is PolicyState.WAITING_CAPACITY and self.retry_at is not None and now < self.retry_at:
            return self._record(obs, Action.HOLD, self.target, None,
                                [f"resources refused: {self.refusal}; retry at {self.retry_at:.1f}"])
        wanted = self._wanted(obs, reasons)
        if wanted is None:
            return self._record(obs, Action.HOLD, self.target, None, reasons or ["nothing measured yet"])
        base = self.target if self.state is PolicyState.SCALING else cur
        prefill = self._pool_size(0, base[0], wanted[0], obs, reasons, may_shrink=True)
        decode = self._pool_size(1, base[1], wanted[1], obs, reasons, may_shrink=prefill >= base[0])  # one at a time
        new = cfg.bounds.clamp(prefill, decode)
        if new == base:
            if self.state is PolicyState.SCALING:
                reasons.append(f"waiting for {self.target[0]}:{self.target[1]} to be ready")
                return self._record(obs, Action.HOLD, self.target, wanted, reasons)
            if self.state is PolicyState.WAITING_CAPACITY and self.target != cur:
                # a target given up (its resources never came): withdraw the workers still pending. (A
                # worker that went silent or died is not this: it comes back, or is restarted.)
                reasons.append(f"no longer waiting for {self.target[0]}:{self.target[1]}: back to {cur[0]}:{cur[1]}")
                return self._change(obs, Action.SCALE_DOWN, cur, wanted, reasons)
            self.state = PolicyState.STEADY
            return self._record(obs, Action.HOLD, cur, wanted, reasons or ["at the predicted size"])
        up = any(n > c for n, c in zip(new, base))
        down = any(n < c for n, c in zip(new, base))
        action = Action.SCALE if up and down else Action.SCALE_UP if up else Action.SCALE_DOWN
        return self._change(obs, action, new, wanted, reasons)

    def _change(self, obs: Observation, action: Action, new: tuple[int, int], wanted, reasons: list[str]) -> Decision:
        self.state = PolicyState.SCALING
        self.scaling_since = self.last_change = obs.now
        self.target = new
        for mem in self.pools:
            mem.slack_streak = mem.streak_max = 0
        return self._record(obs, action, new, wanted, reasons)

    def _wanted(self, obs: Observation, reasons: list[str]) -> tuple[int, int] | None:
        """The predictor's size, raised where the gateway observed an SLO missed that it did not predict."""
        cfg, cur = self.cfg, obs.current
        choice = obs.choice
        if choice.target is not None:
            wanted = list(cfg.bounds.clamp(*choice.target))
            c, t = choice.current, choice.chosen
            reasons.append(f"predicted at {cur[0]}:{cur[1]}: " + _figures(c) + f"; smallest meeting the SLOs: "
                           f"{wanted[0]}:{wanted[1]} ({_figures(t)})" + (f" [{choice.note}]" if choice.note else ""))
        elif obs.num_observed < MIN_OBSERVED:
            return None
        else:
            wanted = list(cur)
        if obs.num_observed >= MIN_OBSERVED and obs.now - self.last_change >= cfg.miss_grace_s:
            misses = ((0, obs.observed_ttft_ms, cfg.slo_ttft_ms, "TTFT"), (1, obs.observed_tpot_ms, cfg.slo_tpot_ms, "TPOT"))
            for pool, seen, slo, name in misses:
                if seen is None or seen <= slo or any(w > c for w, c in zip(wanted, cur)):
                    continue
                i = self._pool_for_miss(pool, obs)
                wanted[i] = cur[i] + 1
                mem = self.pools[i]
                mem.floor, mem.floor_until, mem.floor_rate = wanted[i], obs.now + cfg.hold_after_miss_s, obs.arrival_rate
                reasons.append(f"observed {name} p90 {seen:.0f} ms > SLO {slo:g} ms: one more "
                               f"{'prefill' if i == 0 else 'decode'} worker than predicted")
        return cfg.bounds.clamp(*wanted)

    @staticmethod
    def _pool_for_miss(pool: int, obs: Observation) -> int:
        """A TTFT miss grows the pool whose extra worker the simulator says cuts TTFT most (a busy
        decode pool delays first tokens too: requests wait for a seat before their prefill); TPOT: decode."""
        grow = obs.choice.grow
        if pool == 1 or len(grow) < 2:
            return pool if not grow else (0 if grow[0].prefill > obs.current[0] else 1)
        a, b = sorted(grow, key=lambda x: x.ttft_ms)
        if b.ttft_ms > 1.1 * a.ttft_ms:
            return 0 if a.prefill > obs.current[0] else 1
        # the simulator cannot tell them apart: the busier pool, by the workers' own step times
        return 0 if obs.busy[0] > obs.busy[1] else 1

    def _pool_size(self, i: int, base: int, wanted: int, obs: Observation, reasons: list[str],
                   may_shrink: bool) -> int:
        cfg, mem = self.cfg, self.pools[i]
        name = "prefill" if i == 0 else "decode"
        if wanted > base:
            mem.slack_streak = mem.streak_max = 0
            step = min(wanted, base + cfg.max_step_up)
            reasons.append(f"{name} {base} -> {step} (wanted {wanted})")
            return step
        if wanted == base or not self._has_margin(i, obs):
            mem.slack_streak = mem.streak_max = 0
            return base
        mem.slack_streak += 1
        mem.streak_max = max(mem.streak_max, wanted)
        floor = mem.floor_at(obs.now, obs.arrival_rate, cfg.floor_load)
        if (mem.slack_streak < cfg.down_after or obs.now - self.last_change < cfg.cooldown_s or not may_shrink
                or self.state is PolicyState.SCALING or max(mem.streak_max, floor) >= base):
            reasons.append(f"{name} could shrink to {wanted} ({mem.slack_streak}/{cfg.down_after} intervals of slack)")
            return base
        step = max(base - cfg.max_step_down, mem.streak_max, floor)
        reasons.append(f"{name} {base} -> {step} after {mem.slack_streak} intervals of slack")
        return step

    def _has_margin(self, i: int, obs: Observation) -> bool:
        """One worker fewer in pool `i` meets both SLOs at more load than measured (predicted), and
        the gateway sees no miss."""
        cfg, cur = self.cfg, obs.current
        smaller = (cur[0] - 1, cur[1]) if i == 0 else (cur[0], cur[1] - 1)
        if not any((x.prefill, x.decode) == smaller and x.meets for x in obs.choice.shrink):
            return False
        seen = obs.num_observed >= MIN_OBSERVED
        return not (seen and ((obs.observed_ttft_ms or 0) > cfg.slo_ttft_ms or (obs.observed_tpot_ms or 0) > cfg.slo_tpot_ms))

    def _record(self, obs: Observation, action: Action, target: tuple[int, int], wanted, reasons: list[str]) -> Decision:
        chosen = obs.choice.chosen if obs.choice else None
        d = Decision(obs.now, self.state, action, obs.current, tuple(target), None if wanted is None else tuple(wanted),
                     tuple(reasons), obs.choice.current if obs.choice else None, chosen,
                     self.retry_at if self.state is PolicyState.WAITING_CAPACITY else None)
        self.history.append(d)
        return d


def _figures(p: Prediction | None) -> str:
    if p is None:
        return "n/a"
    return f"TTFT {p.ttft_ms:.0f} ms, TPOT {p.tpot_ms:.1f} ms"

