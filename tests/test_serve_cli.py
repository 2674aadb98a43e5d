"""`splitserve serve` options that shape the worker pools (no server started)."""

from __future__ import annotations

import pytest

from splitserve.api.serve_cli import engine_config_from_args, parse_args, pools_from_args


def pools(*argv):
    args = parse_args(list(argv))
    return {p.role: p for p in pools_from_args(args, engine_config_from_args(args))}


def test_aggregated_is_one_pool_on_the_main_device():
    got = pools("--device", "cpu")
    assert list(got) == ["both"] and got["both"].engine.device == "cpu"


def test_each_pool_may_run_on_its_own_device():
    got = pools("--disaggregated", "--prefill-device", "cuda:1", "--decode-device", "cpu",
                "--prefill-threads", "3", "--decode-block-size", "32")
    assert got["prefill"].engine.device == "cuda:1" and got["prefill"].engine.threads == 3
    assert got["decode"].engine.device == "cpu" and got["decode"].engine.block_size == 32
    assert got["prefill"].engine.block_size == 16  # unchanged where not asked


def test_pool_devices_default_to_device():
    got = pools("--disaggregated", "--device", "cuda")
    assert got["prefill"].engine.device == got["decode"].engine.device == "cuda"


def test_bad_pool_device_is_refused():
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        pools("--disaggregated", "--decode-device", "tpu")


def test_pool_devices_without_disaggregation_are_refused():
    with pytest.raises(ValueError, match="need --disaggregated"):
        pools("--decode-device", "cuda")


def test_split_special_tokens_flag_reaches_the_server_state():
    assert parse_args(["--split-special-tokens"]).split_special_tokens is True
    assert parse_args([]).split_special_tokens is False


def test_decode_backpressure_flags_reach_the_gateway_config():
    from splitserve.api.serve_cli import admission_from_args

    on = admission_from_args(parse_args(["--disaggregated"]))
    assert on.enabled and on.max_queue == 1024
    off = admission_from_args(parse_args(["--disaggregated", "--no-decode-backpressure", "--gateway-queue", "7"]))
    assert not off.enabled and off.max_queue == 7
    with pytest.raises(ValueError, match="add --disaggregated"):
        admission_from_args(parse_args(["--no-decode-backpressure"]))
