"""`splitserve serve --autoscale`: flag checks (clear errors on misuse) and the settings they make."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.api.serve_cli import parse_args
from splitserve.cluster.autoscale_setup import autoscale_from_args


def settings(*argv: str):
    return autoscale_from_args(parse_args(list(argv)))


def test_without_autoscale_nothing_runs_and_its_flags_are_refused():
    assert settings() is None
    with pytest.raises(ValueError, match="only act with --autoscale"):
        settings("--disaggregated", "--slo-ttft-ms", "500")


@pytest.mark.parametrize("argv, message", [
    (("--autoscale", "--slo-ttft-ms", "500", "--slo-tpot-ms", "50"), "needs --disaggregated"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "500"), "--slo-ttft-ms and --slo-tpot-ms"),
    (("--autoscale", "--disaggregated", "--slo-tpot-ms", "50"), "--slo-ttft-ms and --slo-tpot-ms"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "0", "--slo-tpot-ms", "50"), "must be > 0"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "5", "--slo-tpot-ms", "5", "--min-prefill", "0"),
     "--min-prefill"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "5", "--slo-tpot-ms", "5", "--max-decode", "0"),
     "--max-decode"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "5", "--slo-tpot-ms", "5", "--decode-workers", "3",
      "--max-decode", "2"), "within the --min/--max bounds"),
    (("--autoscale", "--disaggregated", "--slo-ttft-ms", "5", "--slo-tpot-ms", "5", "--autoscale-interval-s", "0"),
     "interval"),
])
def test_misuse_is_a_clear_error(argv, message):
    with pytest.raises(ValueError, match=message):
        settings(*argv)


def test_settings_from_flags():
    s = settings("--autoscale", "--disaggregated", "--slo-ttft-ms", "800", "--slo-tpot-ms", "40", "--prefill-workers",
                 "2", "--max-decode", "5", "--autoscale-interval-s", "4", "--autoscale-window-s", "12")
    b = s.policy.bounds
    assert (b.min_prefill, b.max_prefill, b.min_decode, b.max_decode) == (1, 4, 1, 5)
    assert s.policy.slo_ttft_ms == 800 and s.policy.slo_tpot_ms == 40 and s.policy.interval_s == 4
    assert s.window_s == 12 and s.policy.miss_grace_s == 12 and s.policy.cooldown_s == 12


def test_the_server_refuses_to_start_with_a_clear_message():
    """The real command: exits 1 before any worker starts, saying why."""
    proc = subprocess.run([sys.executable, "-m", "splitserve", "serve", "--port", "0", "--autoscale",
                           "--slo-ttft-ms", "500", "--slo-tpot-ms", "50"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--autoscale sizes the prefill and decode pools: it needs --disaggregated" in proc.stderr + proc.stdout
