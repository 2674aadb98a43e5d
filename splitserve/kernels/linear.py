"""Prepacked linear layers: ``y = x @ W.T + b`` with the fastest backend available here.

    op = prepare_linear(weight, bias)      # weight [N, K] as in nn.Linear, bias [N] or None
    y = op(x)                              # x [..., K] -> y [..., N], any M (including 0)

x of another dtype than the weight is cast to the weight dtype and y cast back.

Backends (``op.backend``), chosen per weight dtype/device unless ``SPLITSERVE_LINEAR_BACKEND``
(or the ``backend=`` argument) forces one:

* ``avx512``: bf16 weights on x86 CPUs with AVX512-BF16. Our own kernel (see ``_cpu_ext``),
  weights repacked so each thread streams one contiguous region. On the 2-core Zen 5 VM, cold
  weights: M=1..4 runs at ~90-110% of the torch.sum read bandwidth, 1.2-2.2x oneDNN and
  1.7-3.6x F.linear; M=32 1.05-1.6x oneDNN; M>=512 ~450 GFLOP/s, 1.03-1.10x oneDNN.
  ~1 us call overhead (oneDNN ~14 us, F.linear ~3.6 us), no per-M primitive creation.
  Built on first use (20-130 s on 2 cores, cached in ~/.cache/splitserve/kernels); see ``prebuild()``.
* ``onednn``: weights reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, what inductor's
  freezing pass emits). Default for fp32 CPU weights and the bf16 fallback.
* ``torch``: plain ``F.linear``; always available; the only backend on CUDA and other devices.

Inference only (no autograd). The pybind call is opaque to torch.compile (graph break).
The prepared op holds its own (packed) copy of the weight and does not keep the original
alive (except the ``torch`` backend); drop the nn.Linear's weight to avoid doubling memory.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV_BACKEND = "SPLITSERVE_LINEAR_BACKEND"
BACKENDS = ("torch", "onednn", "avx512")

# Packed buffers at least this large are 2 MiB aligned and madvise(MADV_HUGEPAGE)'d:
# ~1.05-1.2x faster streaming; smaller ones would waste up to 2 MiB each.
HUGEPAGE_MIN_BYTES = 2 << 20


class LinearOp:
    """Callable ``op(x[..., K]) -> y[..., N]``; subclasses hold prepared weights."""

    backend = "?"

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device):
        self.out_features = out_features
        self.in_features = in_features
        self.dtype = dtype
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self._forward2d(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        y = self._forward2d(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def _forward2d(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend}, out={self.out_features}, "
                f"in={self.in_features}, dtype={self.dtype})")


class TorchLinear(LinearOp):
    backend = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[0], weight.shape[1], weight.dtype, weight.device)
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.to(weight.dtype)

    def _forward2d(self, x):
        if x.dtype != self.dtype:  # same contract as the packed backends: compute in weight dtype
            return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class OneDNNLinear(LinearOp):
    """oneDNN inner product on a weight reordered once into its preferred blocked layout."""

    backend = "onednn"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 1):
        super().__init__(weight.shape[0], weight.shape[1], weight.dtype, weight.device)
        # The hint only picks the blocked layout; measured: no difference between 1 and 1024.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        self._op = torch.ops.mkldnn._linear_pointwise.default

    def _forward2d(self, x):
        if x.dtype != self.dtype:
            return self._forward2d(x.to(self.dtype)).to(x.dtype)
        if x.shape[0] == 0:
            return x.new_empty((0, self.out_features))
        return self._op(x.contiguous(), self.packed, self.bias, "none", [], "")


def _pick_nb(n: int, threads: int) -> int:
    """Blocks of 16 rows per group: balance the groups over `threads`, prefer wide groups."""
    nblk = (n + 15) // 16
    for nb in (4, 3, 2):
        if nblk % nb == 0 and (nblk // nb) % threads == 0:
            return nb
    if nblk >= 16 * threads * 4:
        return 4  # many groups: imbalance under 1/16
    for nb in (3, 2):
        if (nblk + nb - 1) // nb % threads == 0:
            return nb
    return 1 if nblk < 4 * threads else 4


class Avx512Linear(LinearOp):
    """bf16 weights repacked for the AVX512-BF16 kernel in ``_cpu_ext``."""

    backend = "avx512"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ext, nb: int | None = None):
        n, k = weight.shape
        super().__init__(n, k, torch.bfloat16, weight.device)
        if k % 2:
            raise ValueError("avx512 backend needs an even in_features")
        self._ext = ext
        self.nb = nb or _pick_nb(n, max(1, torch.get_num_threads()))
        gn = 16 * self.nb
        groups = (n + gn - 1) // gn
        w = weight.detach().to(torch.bfloat16).contiguous()
        if groups * gn != n:
            w = F.pad(w, (0, 0, 0, groups * gn - n))
        src = w.view(groups, gn, k // 2, 2).permute(0, 2, 1, 3)
        nbytes = groups * gn * k * 2
        buf = ext.alloc_buffer(nbytes, nbytes >= HUGEPAGE_MIN_BYTES)
        self.packed = buf.view(torch.bfloat16).view(groups, k * gn)
        self.packed.view(groups, k // 2, gn, 2).copy_(src)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._gemm = ext.gemm

    def _forward2d(self, x):
        if x.dtype != torch.bfloat16:
            return self._forward2d(x.to(torch.bfloat16)).to(x.dtype)
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self._gemm(x, self.packed, self.bias, self.out_features, self.nb)


def _onednn_ok(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def available_backends(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> list[str]:
    """Backends usable for weights of `dtype` on `device`, fastest first (may build the extension)."""
    if torch.device(device).type != "cpu":
        return ["torch"]
    out = []
    if dtype == torch.bfloat16:
        from . import _cpu_ext

        if _cpu_ext.load() is not None:
            out.append("avx512")
    if _onednn_ok(dtype):
        out.append("onednn")
    out.append("torch")
    return out


def prepare_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str | None = None) -> LinearOp:
    """Prepare ``y = x @ weight.T + bias`` for repeated calls.

    weight: [out_features, in_features] (nn.Linear layout); bias: [out_features] or None.
    backend: None/"auto" -> ``$SPLITSERVE_LINEAR_BACKEND`` or the fastest available one
    (CPU bf16: avx512 > onednn > torch; CPU fp32: onednn > torch; other devices: torch).
    A forced backend that can't serve this weight logs a warning and falls back.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    want = (backend or os.environ.get(ENV_BACKEND, "") or "auto").strip().lower()
    if want not in BACKENDS + ("auto",):
        raise ValueError(f"unknown linear backend {want!r}; choose from {BACKENDS + ('auto',)}")
    cands = available_backends(weight.dtype, weight.device)
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2 and "avx512" in cands:
        cands.remove("avx512")
    if want != "auto":
        if want in cands:
            cands = [want]
        else:
            log.warning("linear backend %r unavailable for %s %s weight %s; using %s",
                        want, weight.device.type, weight.dtype, tuple(weight.shape), cands[0])
    for name in cands:
        try:
            if name == "avx512":
                from . import _cpu_ext

                return Avx512Linear(weight, bias, _cpu_ext.load())
            if name == "onednn":
                return OneDNNLinear(weight, bias)
        except Exception as e:  # fall through to the next backend
            log.warning("linear backend %s failed to prepare %s: %s", name, tuple(weight.shape), e)
    return TorchLinear(weight, bias)
