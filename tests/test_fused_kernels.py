"""splitserve.kernels.fused: every op (C++ kernel and torch fallback) against the torch references.

bf16 elementwise ops must agree with the unfused torch code to within one bf16 ulp (they repeat
its roundings; only RMSNorm's sum order differs); fp32 within 1e-5. Attention is compared with
an fp64 reference on the same inputs.
"""

import math

import pytest
import torch

from splitserve.kernels import fused

try:  # the runner's unfused bf16 decode path, for an accuracy comparison
    from splitserve.models.attention import decode_attention
except ImportError:  # pragma: no cover
    decode_attention = None

BF, F32 = torch.bfloat16, torch.float32


@pytest.fixture(params=["kernel", "fallback"])
def impl(request, monkeypatch):
    if request.param == "kernel":
        if not fused.kernels_available():
            pytest.skip("C++ kernels unavailable here")
    else:
        monkeypatch.setattr(fused, "_ext", None)
        monkeypatch.setattr(fused, "_ext_loaded", True)
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(out, ref, dtype, ulps=1):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.double(), ref.double()
    if dtype == BF:
        # one bf16 ulp of the reference value (8 significant bits), plus denormal slack
        tol = ulps * r.abs() * 2.0 ** -7 + 1e-30
        bad = (o - r).abs() > tol
        assert not bad.any(), f"{int(bad.sum())} elements off, max {(o - r).abs().max().item()}"
    else:
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


# ---- RMSNorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("T,H", [(1, 576), (3, 2048), (17, 64), (2, 13), (1, 1)])
def test_rms_norm(impl, dtype, T, H):
    g = _gen(T * 100 + H)
    big = (torch.randn(T, H + 7, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(H, generator=g) * 0.2).to(dtype)
    for x in (big[:, :H].contiguous(), big[:, 3 : 3 + H]):  # contiguous and strided rows
        out = fused.rms_norm(x, w, 1e-6)
        _close(out, fused.rms_norm_ref(x, w, 1e-6), dtype)
        assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [BF, F32])
def test_rms_norm_3d_and_zero_rows(impl, dtype):
    g = _gen(7)
    x = torch.randn(4, 9, 3 * 64, generator=g).to(dtype)[:, :, 64:128]  # per-head norm on a qkv view
    w = torch.randn(64, generator=g).to(dtype)
    _close(fused.rms_norm(x, w, 1e-5), fused.rms_norm_ref(x, w, 1e-5), dtype)
    assert fused.rms_norm(x[:0], w, 1e-5).shape == (0, 9, 64)
    # a zero row normalises to zeros (rsqrt(eps) * 0), no NaN
    z = torch.zeros(2, 64, dtype=dtype)
    assert torch.equal(fused.rms_norm(z, w, 1e-5), torch.zeros_like(z))


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("T,H", [(1, 576), (5, 2048), (3, 100), (1, 7)])
def test_add_rms_norm(impl, dtype, T, H):
    g = _gen(T * 1000 + H)
    x = torch.randn(T, H, generator=g).to(dtype)
    res = (torch.randn(T, 2 * H, generator=g) * 10).to(dtype)[:, ::2]  # non-unit inner stride
    w = (1 + torch.randn(H, generator=g) * 0.2).to(dtype)
    x_before, res_before = x.clone(), res.clone()
    normed, new_res = fused.add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_res = fused.add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)  # residual + x rounded to x.dtype, exactly
    _close(normed, ref_normed, dtype)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)  # inputs untouched


# ---- SiLU * up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("T,I", [(1, 1536), (4, 5632), (3, 7), (1, 1)])
def test_silu_mul(impl, dtype, T, I):
    g = _gen(T * 7 + I)
    gu = (torch.randn(T, 2 * I + 4, generator=g) * 4).to(dtype)[:, 2 : 2 + 2 * I]  # strided rows
    _close(fused.silu_mul(gu), fused.silu_mul_ref(gu), dtype)
    assert fused.silu_mul(gu).shape == (T, I)


@pytest.mark.parametrize("dtype", [BF, F32])
def test_silu_mul_extremes(impl, dtype):
    vals = torch.tensor([0.0, -0.0, 1e-3, -1e-3, 20.0, -20.0, 87.0, -87.0, 89.0, -89.0, 100.0, -100.0,
                         -104.0, 3e4, -3e4, 1e30, -1e30, float("inf"), float("-inf")] * 2)
    gate = vals.view(1, -1)
    up = torch.linspace(-3, 3, gate.shape[1]).view(1, -1)
    gu = torch.cat([gate, up], 1).to(dtype)
    out, ref = fused.silu_mul(gu), fused.silu_mul_ref(gu)
    finite = ref.isfinite()
    _close(out[finite], ref[finite], dtype)
    assert torch.equal(out.isnan(), ref.isnan())  # inf*0 etc. agree
    assert fused.silu_mul(torch.zeros(0, 8, dtype=dtype)).shape == (0, 4)


# ---- rotary ------------------------------------------------------------------------------------

def _rope_tables(T, D, g, dtype, positions=None):
    pos = torch.randint(0, 8192, (T,), generator=g).float() if positions is None else positions.float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(pos, inv)] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("T,Hq,Hk,D", [(1, 9, 3, 64), (7, 32, 8, 64), (2, 4, 4, 128), (3, 6, 2, 80), (1, 2, 1, 2)])
def test_apply_rotary_on_qkv_views(impl, dtype, T, Hq, Hk, D):
    g = _gen(T * 31 + Hq * 7 + D)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    v_before = qkv[:, (Hq + Hk) * D :].clone()
    cos, sin = _rope_tables(T, D, g, dtype)
    rq, rk = fused.apply_rotary_ref(q, k, cos, sin)
    oq, ok = fused.apply_rotary(q, k, cos, sin)
    assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()  # in place
    _close(q, rq, dtype)
    _close(k, rk, dtype)
    if dtype == BF:  # same three roundings as the torch expression: bit-exact
        assert torch.equal(q, rq) and torch.equal(k, rk)
    assert torch.equal(qkv[:, (Hq + Hk) * D :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [BF, F32])
def test_apply_rotary_strided_tables_and_heads(impl, dtype):
    g = _gen(3)
    T, H, D = 5, 4, 64
    cos_t, sin_t = _rope_tables(64, D, g, dtype, positions=torch.arange(64))
    pos = torch.tensor([0, 5, 63, 2, 2])
    cos, sin = cos_t[pos], sin_t[pos]
    big = torch.randn(T, 2 * H, D, generator=g).to(dtype)
    q = big[:, ::2]  # head stride 2*D
    k = torch.randn(T, 1, D, generator=g).to(dtype)
    rq, rk = fused.apply_rotary_ref(q, k, cos, sin)
    fused.apply_rotary(q, k, cos, sin)
    _close(q, rq, dtype)
    _close(k, rk, dtype)
    # position 0 is the identity
    assert torch.equal(q[0], rq[0])


# ---- paged decode attention --------------------------------------------------------------------

def _paged_setup(lens, Hq, Hk, D, bs, dtype, g, idx_dtype=torch.int32, q_view=True):
    B = len(lens)
    nblk = [max(1, -(-L // bs)) for L in lens]
    nb = sum(nblk) + 3
    kc = torch.randn(nb * bs, Hk, D, generator=g).to(dtype)
    vc = torch.randn(nb * bs, Hk, D, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    table = torch.full((B, max(nblk) + 1), 10**6, dtype=idx_dtype)  # garbage past each context
    i = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[i : i + n].to(idx_dtype)
        i += n
    if q_view:  # q as a view into a fused qkv output
        qkv = (torch.randn(B, (Hq + 2 * Hk) * D, generator=g) * 2).to(dtype)
        q = qkv[:, : Hq * D].view(B, Hq, D)
    else:
        q = (torch.randn(B, Hq, D, generator=g) * 2).to(dtype)
    return q, kc, vc, table, torch.tensor(lens, dtype=idx_dtype)


def _attn_ref64(q, kc, vc, table, lens, bs, scale):
    B, Hq, D = q.shape
    Hk = kc.shape[1]
    lens = lens.long()
    L = max(1, int(lens.max()))
    pos = torch.arange(L)
    pad = pos.unsqueeze(0) >= lens.unsqueeze(1)  # [B, L]
    slots = (table.long()[:, (pos // bs).clamp_max(table.shape[1] - 1)] * bs + pos % bs).masked_fill(pad, 0)
    k = kc[slots].double().permute(0, 2, 3, 1)  # [B, Hk, D, L]
    v = vc[slots].double().transpose(1, 2)  # [B, Hk, L, D]
    s = torch.matmul(q.double().reshape(B, Hk, Hq // Hk, D), k) * scale
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(p, v).reshape(B, Hq, D)


def _check_attn(out, ref64, dtype):
    assert out.dtype == dtype
    if dtype == BF:
        torch.testing.assert_close(out.double(), ref64, atol=1.5e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(out.double(), ref64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (9, 3), (32, 8), (8, 1)])
@pytest.mark.parametrize("bs", [1, 16, 32])
def test_paged_decode_attention(impl, dtype, Hq, Hk, bs):
    g = _gen(Hq * 100 + Hk * 10 + bs)
    D = 64
    lens = [1, 17, 300, 33, 0] if Hq != 32 else [5, 200]
    q, kc, vc, table, cl = _paged_setup(lens, Hq, Hk, D, bs, dtype, g)
    scale = D ** -0.5
    ref = _attn_ref64(q, kc, vc, table, cl, bs, scale)
    out = fused.paged_decode_attention(q, kc, vc, table, cl, bs, scale)
    _check_attn(out, ref, dtype)
    if 0 in lens:  # empty context -> zeros
        assert torch.equal(out[lens.index(0)], torch.zeros_like(out[0]))


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("D", [128, 80, 32, 256, 8])
def test_paged_decode_attention_head_dims(impl, dtype, D):
    g = _gen(D)
    q, kc, vc, table, cl = _paged_setup([1, 40, 270], 6, 2, D, 16, dtype, g, idx_dtype=torch.int64, q_view=False)
    ref = _attn_ref64(q, kc, vc, table, cl, 16, 1 / math.sqrt(D))
    _check_attn(fused.paged_decode_attention(q, kc, vc, table, cl, 16, 1 / math.sqrt(D)), ref, dtype)


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("split", [0, -1, 1, 40, 256])
def test_paged_decode_attention_long_context_splits(impl, dtype, threads, split):
    """B=1 long contexts: split into work items over threads and recombined; chunk boundaries."""
    g = _gen(split + 10 * threads)
    q, kc, vc, table, cl = _paged_setup([1000], 9, 3, 64, 16, dtype, g)
    # large score spread: the running max must be rescaled across chunks/splits
    kc[:: 7] *= 4
    ref = _attn_ref64(q, kc, vc, table, cl, 16, 0.125)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = fused.paged_decode_attention(q, kc, vc, table, cl, 16, 0.125, split_tokens=split)
    finally:
        torch.set_num_threads(old)
    _check_attn(out, ref, dtype)


def test_paged_decode_attention_out_param_and_batch(impl):
    g = _gen(11)
    lens = [int(x) for x in torch.randint(250, 351, (32,), generator=g)]
    q, kc, vc, table, cl = _paged_setup(lens, 9, 3, 64, 16, BF, g)
    buf = torch.full((40, 9, 64), 7.0, dtype=BF)
    res = fused.paged_decode_attention(q, kc, vc, table, cl, 16, 0.125, out=buf[:32])
    assert res.data_ptr() == buf.data_ptr()
    assert torch.all(buf[32:] == 7.0)
    ref = _attn_ref64(q, kc, vc, table, cl, 16, 0.125)
    _check_attn(buf[:32], ref, BF)
    # at least as close to fp64 as the runner's unfused bf16 path (decode_attention)
    if decode_attention is None:
        return
    L = max(lens)
    pos = torch.arange(L)
    slots = table.long()[:, (pos // 16).clamp_max(table.shape[1] - 1)] * 16 + pos % 16
    pad = pos.unsqueeze(0) >= cl.long().unsqueeze(1)
    old = decode_attention(q, kc, vc, slots.masked_fill(pad, 0), pad[:, None, None, :], 0.125)
    assert (buf[:32].double() - ref).abs().max() <= (old.double() - ref).abs().max() + 1e-3


def test_paged_decode_attention_errors():
    if not fused.kernels_available():
        pytest.skip("C++ kernels unavailable here")
    g = _gen(5)
    q, kc, vc, table, cl = _paged_setup([20], 4, 2, 64, 16, BF, g)
    with pytest.raises(RuntimeError):
        fused.paged_decode_attention(q, kc, vc, table, torch.tensor([10**4], dtype=torch.int32), 16, 0.1)
    bad = table.clone()
    bad[0, 0] = 10**6
    with pytest.raises(RuntimeError):
        fused.paged_decode_attention(q, kc, vc, bad, cl, 16, 0.1)


def test_fallback_on_other_dtypes():
    """float64 (and any non-bf16/fp32 or non-CPU tensor) takes the torch path."""
    g = _gen(9)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), fused.rms_norm_ref(x, w, 1e-6))
    q, kc, vc, table, cl = _paged_setup([5, 30], 4, 2, 16, 4, torch.float64, g)
    torch.testing.assert_close(fused.paged_decode_attention(q, kc, vc, table, cl, 4, 0.25),
                               _attn_ref64(q, kc, vc, table, cl, 4, 0.25))


@pytest.mark.parametrize("dtype", [BF, F32])
def test_apply_rotary_with_positions(impl, dtype):
    """Whole cos/sin tables + positions (gathered inside the kernel) == pre-gathered rows."""
    g = _gen(21)
    T, Hq, Hk, D = 6, 9, 3, 64
    cos_t, sin_t = _rope_tables(128, D, g, dtype, positions=torch.arange(128))
    for pos in (torch.tensor([0, 1, 127, 5, 5, 64]), torch.tensor([3, 2, 1, 0, 9, 8], dtype=torch.int32)):
        qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
        q = qkv[:, : Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
        rq, rk = fused.apply_rotary_ref(q, k, cos_t[pos.long()], sin_t[pos.long()])
        fused.apply_rotary(q, k, cos_t, sin_t, positions=pos)
        _close(q, rq, dtype)
        _close(k, rk, dtype)
    if impl == "kernel":
        with pytest.raises(RuntimeError):  # position outside the table
            fused.apply_rotary(q, k, cos_t, sin_t, positions=torch.tensor([0, 1, 2, 3, 4, 128]))


@pytest.mark.parametrize("dtype", [BF, F32])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_kv(impl, dtype, slot_dtype):
    g = _gen(4)
    T, Hq, Hk, D, S = 5, 9, 3, 64, 40
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    k = qkv[:, Hq * D : (Hq + Hk) * D].view(T, Hk, D)
    v = qkv[:, (Hq + Hk) * D :].view(T, Hk, D)
    kv = torch.randn(2, 2, S, Hk, D, generator=g).to(dtype)  # [layers, k/v, ...] like the runner
    ref = kv.clone()
    slots = torch.tensor([7, 0, 39, 12, 13], dtype=slot_dtype)
    fused.write_kv(k, v, kv[1, 0], kv[1, 1], slots)
    fused.write_kv_ref(k, v, ref[1, 0], ref[1, 1], slots.long())
    assert torch.equal(kv, ref)
    if impl == "kernel":
        with pytest.raises(RuntimeError):
            fused.write_kv(k, v, kv[1, 0], kv[1, 1], torch.tensor([0, 1, 2, 3, 40]))


@pytest.mark.parametrize("offset", [0, 1, 3, 62])
def test_copy_stream_is_an_exact_copy_at_any_size_and_alignment(impl, offset):
    """The streaming-store copy (KV written into a peer's cache): unaligned heads, 256-byte
    body, tails; falls back to copy_ without the kernels."""
    gen = torch.Generator().manual_seed(offset)
    for n in [0, 1, 63, 64, 65, 255, 256, 257, 1000, 4096 + 17, (1 << 20) + 5]:
        base = torch.randint(0, 256, (n + 128,), dtype=torch.uint8, generator=gen)
        src = base[offset : offset + n]
        out = torch.zeros(n + 128, dtype=torch.uint8)
        dst = out[(offset * 7) % 64 : (offset * 7) % 64 + n]
        fused.copy_stream(dst, src)
        assert torch.equal(dst, src)
        assert not out[: (offset * 7) % 64].any() and not out[(offset * 7) % 64 + n :].any()  # nothing else written
    x = torch.randn(300, 3, 64).to(torch.bfloat16)
    y = torch.empty_like(x)
    fused.copy_stream(y, x)
    assert torch.equal(x, y)


def test_copy_rows_copies_each_run_and_nothing_else(impl):
    """Many runs of cache rows in one call (a request's KV over scattered blocks): exactly the
    runs land, every other row of the destination is untouched; a run out of range is refused."""
    src = torch.randn(200, 3, 64).to(torch.bfloat16)
    dst = torch.zeros(300, 3, 64, dtype=torch.bfloat16)
    runs = [(0, 290, 10), (16, 0, 1), (33, 100, 47), (199, 150, 1), (80, 200, 0)]
    fused.copy_rows(dst, src, runs)
    want = torch.zeros_like(dst)
    for a, b, n in runs:
        want[b : b + n] = src[a : a + n]
    assert torch.equal(dst, want)
    again = torch.zeros_like(dst)  # the connector's call: the runs also as a kept int64 tensor
    fused.copy_rows(again, src, runs, torch.tensor(runs, dtype=torch.long))
    assert torch.equal(again, want)
    fused.copy_rows(again, src, [])  # nothing to copy: nothing changes
    assert torch.equal(again, want)
    for bad in ([(190, 0, 11)], [(0, 295, 6)], [(-1, 0, 2)]):  # refused on both paths, nothing written
        with pytest.raises(RuntimeError, match="out of range"):
            fused.copy_rows(again, src, bad)
    assert torch.equal(again, want)
