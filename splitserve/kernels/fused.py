"""Fused decode-step ops: RMSNorm (+ residual add), rotary, KV write, SiLU*up, paged decode attention.

    from splitserve.kernels import fused
    x = fused.rms_norm(x, w, eps)                          # x [T, H] (or [T, n, H])
    x, residual = fused.add_rms_norm(x, residual, w, eps)  # residual := residual + x, then norm
    q, k = fused.apply_rotary(q, k, cos, sin)              # IN PLACE on q, k; returns them
    fused.apply_rotary(q, k, cos_table, sin_table, positions=pos)  # same, gathering the rows itself
    fused.write_kv(k, v, k_cache, v_cache, slots)          # both index_copy_ in one call
    y = fused.silu_mul(gate_up)                            # [T, 2I] -> [T, I]
    o = fused.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                     block_size, scale)    # q [B, Hq, D] -> [B, Hq, D]

Each op runs the AVX512 C++ kernel of ``_cpu_ext`` (the same one-build extension as the linear
layers) for bf16/fp32 CPU tensors, and otherwise (CUDA, other dtypes, extension unavailable or
``SPLITSERVE_DISABLE_CPU_EXT=1``) the pure-torch reference ``*_ref`` next to it, which is the
arithmetic of the unfused model code. The elementwise kernels repeat torch's bf16 roundings
(every torch op rounds its result to bf16), so in bf16 they agree with the references bit for
bit except where a sum's order differs (RMSNorm's mean: an occasional 1-ulp difference).
Attention accumulates in fp32 throughout (scores, softmax, P@V), so it is slightly *more*
accurate than the reference, which rounds the scores and the probabilities to bf16.

Inference only: no autograd (the kernels ignore requires_grad). Inputs need a unit stride in
the last dim for the kernels (others are made contiguous first); any row/head strides are
read in place, e.g. q/k/v views into a fused qkv output. The kernels use torch's intra-op
threads (``torch.set_num_threads``); small problems (a decode step's rows) run on the calling
thread, since a fork/join costs more than the op. Each call costs ~0.5-2 us at T=1 (pybind
plus output allocation) against 7-30 us for the torch expressions they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _cpu_ext

_ext = None
_ext_loaded = False


def _load():
    global _ext, _ext_loaded
    if not _ext_loaded:
        mod = _cpu_ext.load()
        _ext = mod if mod is not None and hasattr(mod, "paged_decode_attention") else None
        _ext_loaded = True
    return _ext


def kernels_available() -> bool:
    """True when the C++ kernels serve bf16/fp32 CPU tensors here."""
    return _load() is not None


# The C++ entry points check device/dtype/rank themselves (cheaper than doing it here) and
# return None / False for inputs they do not serve; the wrappers then run the torch reference.

# ---- RMSNorm ------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, round to x.dtype, scale by weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    residual = residual + x
    return rms_norm_ref(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x ([T, H] or [T, n, H]); returns a new contiguous tensor."""
    ext = _ext if _ext_loaded else _load()
    if ext is not None:
        out = ext.rms_norm(x, weight, eps)
        if out is not None:
            return out
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(residual + x), residual + x): the sum is rounded to x.dtype before the norm
    (as in transformers). Both outputs are new tensors; the inputs are not modified."""
    ext = _ext if _ext_loaded else _load()
    if ext is not None:
        out = ext.add_rms_norm(x, residual, weight, eps)
        if out is not None:
            return out
    return add_rms_norm_ref(x, residual, weight, eps)


# ---- rotary ------------------------------------------------------------------------------------

def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor | None = None):
    """Out of place: (q*cos + rotate_half(q)*sin, same for k); cos/sin [T, D] (or tables + positions)."""
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor | None = None):
    """Rotate-half rotary embedding, IN PLACE: q [T, Hq, D] and k [T, Hk, D] (any strides, e.g.
    views into a fused qkv output) are overwritten and returned (on every path).
    cos/sin: [T, D] rows for the tokens, same dtype as q; or, with ``positions`` [T] (int64/int32),
    the whole [max_positions, D] tables, indexed inside the kernel (saves two gathers a layer)."""
    ext = _ext if _ext_loaded else _load()
    if ext is not None and ext.apply_rotary(q, k, cos, sin, positions):
        return q, k
    q_out, k_out = apply_rotary_ref(q, k, cos, sin, positions)
    q.copy_(q_out)
    k.copy_(k_out)
    return q, k


# ---- KV cache write ----------------------------------------------------------------------------

def write_kv_ref(k, v, k_cache, v_cache, slots) -> None:
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache[slots] = k, v_cache[slots] = v for k/v [T, Hk, D] (e.g. views into qkv) and
    slots [T] (int64/int32): one call instead of two index_copy_."""
    ext = _ext if _ext_loaded else _load()
    if ext is not None and ext.write_kv(k, v, k_cache, v_cache, slots):
        return
    write_kv_ref(k, v, k_cache, v_cache, slots.long())


# ---- SiLU(gate) * up ---------------------------------------------------------------------------

def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :i]) * gate_up[..., i:]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:] ([T, I], new tensor)."""
    ext = _ext if _ext_loaded else _load()
    if ext is not None:
        out = ext.silu_mul(gate_up)
        if out is not None:
            return out
    return silu_mul_ref(gate_up)


# ---- paged decode attention --------------------------------------------------------------------

def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, block_size: int,
                               scale: float) -> torch.Tensor:
    """fp32 torch reference: gathers each request's context from the paged cache, masks padding."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[1]
    lens = context_lens.to(device=q.device, dtype=torch.long)
    L = int(lens.max()) if B else 0
    if L == 0:
        return torch.zeros_like(q)
    pos = torch.arange(L, device=q.device)
    pad = pos.unsqueeze(0) >= lens.unsqueeze(1)  # [B, L]
    blocks = block_tables.to(device=q.device, dtype=torch.long)[:, (pos // block_size).clamp_max(block_tables.shape[1] - 1)]
    slots = (blocks * block_size + pos % block_size).masked_fill(pad, 0)
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32 math for bf16/fp16 (fp64 stays fp64)
    k = k_cache.index_select(0, slots.reshape(-1)).view(B, L, Hk, D).to(ct)
    v = v_cache.index_select(0, slots.reshape(-1)).view(B, L, Hk, D).to(ct)
    qg = q.to(ct).reshape(B, Hk, Hq // Hk, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(pad.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # context 0 -> zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float, out: torch.Tensor | None = None,
                           split_tokens: int = 0) -> torch.Tensor:
    """One query token per request against its paged context.

    q [B, Hq, D] (any strides with unit inner stride, e.g. a view into qkv); k_cache/v_cache
    [num_slots, Hk, D], slot = block * block_size + offset; block_tables [B, max_blocks]
    int32/int64; context_lens [B] int32/int64 CPU tensor: tokens attended, including the current
    one (whose K/V must already be in the cache); 0 gives zeros. Hq must be a multiple of Hk.
    Returns [B, Hq, D] in q's dtype, written into `out` when given (e.g. ``attn_out[:B]``).
    split_tokens: tokens per work item for the kernel (0: automatic, -1: never split).
    """
    ext = _ext if _ext_loaded else _load()
    if ext is not None:
        o = ext.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                                       out, split_tokens)
        if o is not None:
            return o
    o = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)
    if out is not None:
        out.copy_(o)
        return out
    return o


__all__ = [
    "add_rms_norm", "add_rms_norm_ref", "apply_rotary", "apply_rotary_ref", "kernels_available",
    "paged_decode_attention", "paged_decode_attention_ref", "rms_norm", "rms_norm_ref", "silu_mul",
    "silu_mul_ref", "write_kv", "write_kv_ref",
]


def copy_stream(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for same-size contiguous CPU tensors, with streaming stores when the kernels
    are built (bytes this process will not read again: KV written into a peer's cache)."""
    mod = _load()
    if (mod is not None and dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.is_contiguous() and src.is_contiguous() and dst.shape == src.shape):
        mod.copy_stream(dst, src)
    else:
        dst.copy_(src)


def copy_rows(dst: torch.Tensor, src: torch.Tensor, runs: list[tuple[int, int, int]],
              runs_tensor: torch.Tensor | None = None) -> None:
    """dst[d:d+n] = src[s:s+n] for each (s, d, n) in `runs`, streaming stores, one call for all runs
    when the kernels are built (a per-run Python call costs more than copying a 16-token block).
    `runs_tensor`: the same runs as an int64 [n, 3] tensor, when the caller keeps one."""
    mod = _load()
    if (mod is not None and dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.is_contiguous() and src.is_contiguous() and dst.shape[1:] == src.shape[1:]):
        if runs_tensor is None:
            runs_tensor = torch.tensor(runs, dtype=torch.long).view(-1, 3)
        mod.copy_rows(dst, src, runs_tensor)
        return
    for i, (a, b, n) in enumerate(runs):  # the kernel's checks, so both paths refuse the same runs
        if n < 0 or a < 0 or b < 0 or a + n > src.shape[0] or b + n > dst.shape[0]:
            raise RuntimeError(f"copy_rows: run {i} out of range")
    for a, b, n in runs:
        dst[b : b + n].copy_(src[a : a + n])
