"""prepare_linear: every available backend matches F.linear (fp32 reference) within bf16 tolerance."""

import pytest
import torch
import torch.nn.functional as F

from splitserve.kernels import linear as L
from splitserve.kernels import available_backends, prepare_linear

BF16 = available_backends(torch.bfloat16)
FP32 = available_backends(torch.float32)


def _ref(x, w, b):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


def _check(y, x, w, b, dtype):
    ref = _ref(x, w, b)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # bf16 output: one rounding of an fp32 accumulation -> ~2^-8 relative; compare to the
    # output scale (row norm of |x||w|), like F.linear's own error.
    scale = x.double().abs() @ w.double().abs().t()
    if b is not None:
        scale = scale + b.double().abs()
    scale = scale.clamp_min(1e-3)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    err = ((y.double() - ref).abs() / scale).max().item()
    assert err < tol, err
    torch_err = ((F.linear(x, w, b).double() - ref).abs() / scale).max().item()
    assert err <= 2 * torch_err + tol / 4


@pytest.mark.parametrize("backend", BF16)
@pytest.mark.parametrize("n,k", [(64, 32), (100, 64), (960, 576), (48, 30), (17, 2)])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 13, 32, 65])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_backends_match(backend, n, k, m, with_bias):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + m)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    op = prepare_linear(w, b, backend=backend)
    assert op.backend == backend
    _check(op(x), x, w, b, torch.bfloat16)


@pytest.mark.parametrize("backend", FP32)
@pytest.mark.parametrize("m", [1, 5, 64])
def test_fp32_backends_match(backend, m):
    g = torch.Generator().manual_seed(m)
    w, b, x = torch.randn(200, 96, generator=g), torch.randn(200, generator=g), torch.randn(m, 96, generator=g)
    op = prepare_linear(w, b, backend=backend)
    assert op.backend == backend
    _check(op(x), x, w, b, torch.float32)


@pytest.mark.parametrize("backend", BF16)
def test_large_m_and_shapes(backend):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g).to(torch.bfloat16)
    op = prepare_linear(w, None, backend=backend)
    x = torch.randn(1030, 128, generator=g).to(torch.bfloat16)
    _check(op(x), x, w, None, torch.bfloat16)
    # leading dims, empty batch, non-contiguous rows, fp32 input against bf16 weights
    assert op(x.view(2, 515, 128)).shape == (2, 515, 96)
    assert op(x[:0]).shape == (0, 96)
    xs = torch.randn(8, 256, generator=g).to(torch.bfloat16)[:, ::2]
    _check(op(xs), xs, w, None, torch.bfloat16)
    xt = torch.randn(4, 128, generator=g).to(torch.bfloat16)
    y32 = op(xt.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, op(xt).float())


def test_auto_choice_and_env(monkeypatch):
    w = torch.randn(64, 64).to(torch.bfloat16)
    monkeypatch.delenv(L.ENV_BACKEND, raising=False)
    assert prepare_linear(w).backend == BF16[0]
    assert prepare_linear(w.float()).backend == FP32[0]
    monkeypatch.setenv(L.ENV_BACKEND, "torch")
    assert prepare_linear(w).backend == "torch"
    monkeypatch.setenv(L.ENV_BACKEND, "nonsense")
    with pytest.raises(ValueError):
        prepare_linear(w)
    # a forced backend that can't serve the weight falls back (avx512 is bf16-only, even K only)
    monkeypatch.setenv(L.ENV_BACKEND, "avx512")
    assert prepare_linear(w.float()).backend in FP32
    assert prepare_linear(torch.randn(16, 33).to(torch.bfloat16)).backend != "avx512"
    assert prepare_linear(w.half()).backend == "torch"


def test_pick_nb_balances_two_threads():
    for n in (576, 960, 3072, 2048, 11264, 32000, 49152, 100, 16, 8):
        nb = L._pick_nb(n, 2)
        groups = -(-((n + 15) // 16) // nb)
        assert 1 <= nb <= 4
        assert groups % 2 == 0 or groups >= 128 or groups == 1, (n, nb)


@pytest.mark.skipif("avx512" not in BF16, reason="AVX512-BF16 extension unavailable")
def test_avx512_threads_agree():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    op = prepare_linear(w, None, backend="avx512")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = op(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, op(x))


def test_machine_measurements_quick():
    from splitserve.kernels.machine import measure_bf16_matmul_flops, measure_memory_read_bandwidth

    assert measure_memory_read_bandwidth(threads=1, seconds=0.05, size_mb=64) > 0.5
    assert measure_bf16_matmul_flops(threads=1, n=256, seconds=0.05) > 0.5


def test_fallback_without_extension():
    import subprocess
    import sys

    code = (
        "import torch; from splitserve.kernels import prepare_linear, available_backends, prebuild\n"
        "assert 'avx512' not in available_backends(torch.bfloat16)\n"
        "assert 'disabled' in prebuild()\n"
        "w = torch.randn(64, 32).to(torch.bfloat16); x = torch.randn(3, 32).to(torch.bfloat16)\n"
        "op = prepare_linear(w, None, backend='avx512')\n"
        "assert op.backend != 'avx512', op\n"
        "torch.testing.assert_close(op(x).float(), torch.nn.functional.linear(x, w).float(), rtol=2e-2, atol=2e-2)\n"
    )
    env = dict(__import__("os").environ, SPLITSERVE_DISABLE_CPU_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
