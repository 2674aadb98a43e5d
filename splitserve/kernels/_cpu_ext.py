"""AVX512-BF16 small-M GEMM for bf16 linear layers on x86 CPUs, built on first use.

The C++ source below is compiled with ``torch.utils.cpp_extension.load`` (gcc, ninja) the
first time :func:`load` is called in an environment, and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes only
``dlopen`` it (~0.1 s). The first build takes ~10-15 s on 2 cores. Any failure (no
compiler, no ninja, CPU without avx512_bf16, ...) makes :func:`load` return ``None`` and
the caller falls back to oneDNN or plain torch.

Packed weight layout (bf16 as int16), for a weight W[N, K] (nn.Linear layout), K even:

    packed[g, p, j, t] = W[g*NB*16 + j, 2*p + t]      shape [G, K/2, NB*16, 2]

with G = ceil(N / (NB*16)) groups of NB blocks of 16 output rows (rows past N are zero).
One group is a single linear stream of NB*64 bytes per pair of k; a thread owns a
contiguous range of groups, so each thread reads one contiguous region of memory.
The microkernel keeps MR x NB fp32 zmm accumulators and issues, per k-pair, NB weight
loads and MR*NB ``vdpbf16ps`` with x[m, 2p:2p+2] broadcast (fp32 accumulation, a single
rounding to bf16 at the end, like oneDNN/F.linear).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

log = logging.getLogger(__name__)

CPP_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

template <int MR, int NB>
inline void micro(const int16_t* __restrict wg, int64_t Kp,
                  const int16_t* __restrict x, int64_t ldx,
                  const float* __restrict bias, int64_t n0, int64_t N,
                  int16_t* __restrict y, int64_t ldy) {
  __m512 acc[MR][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const int16_t* wp = wg;
  for (int64_t p = 0; p < Kp; ++p) {
    __m512i w[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512((const void*)(wp + b * 32));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t xv;
      std::memcpy(&xv, x + m * ldx + 2 * p, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xv);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xb, (__m512bh)w[b]);
    }
    wp += NB * 32;
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    const int64_t n = n0 + b * 16;
    if (n >= N) break;
    const int64_t rem = N - n;
    const __mmask16 mask = rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256bh o = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][b], bv));
      _mm256_mask_storeu_epi16((void*)(y + m * ldy + n), mask, (__m256i)o);
    }
  }
}

template <int NB>
void run_groups(const int16_t* W, int64_t g0, int64_t g1, int64_t Kp,
                const int16_t* x, int64_t M, int64_t ldx,
                const float* bias, int64_t N, int16_t* y, int64_t ldy) {
  // MR*NB accumulators + NB weights + 1 broadcast must fit in 32 zmm registers.
  constexpr int MRMAX = NB >= 4 ? 6 : (NB == 3 ? 7 : 8);
  const int64_t gstride = Kp * NB * 32;
  for (int64_t g = g0; g < g1; ++g) {
    const int16_t* wg = W + g * gstride;
    const int64_t n0 = g * NB * 16;
    int64_t m = 0;
    for (; m + MRMAX <= M; m += MRMAX)
      micro<MRMAX, NB>(wg, Kp, x + m * ldx, ldx, bias, n0, N, y + m * ldy, ldy);
    const int64_t r = M - m;
    const int16_t* xm = x + m * ldx;
    int16_t* ym = y + m * ldy;
    switch (r) {
      case 1: micro<1, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 2: micro<2, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 3: micro<3, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 4: micro<4, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 5: micro<5, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 6: if constexpr (MRMAX > 6) micro<6, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      case 7: if constexpr (MRMAX > 7) micro<7, NB>(wg, Kp, xm, ldx, bias, n0, N, ym, ldy); break;
      default: break;
    }
  }
}

}  // namespace

// y[M, N] = x[M, K] @ W^T (+ bias), x bf16 with unit inner stride, packed as described above.
at::Tensor gemm(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                int64_t N, int64_t nb) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16 [M, K] input expected");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "input must have unit inner stride");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 2,
              "packed weight must be a contiguous bf16 [G, K*NB*16] tensor");
  TORCH_CHECK(nb >= 1 && nb <= 4, "nb must be in 1..4");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % 2 == 0, "K must be even");
  const int64_t Kp = K / 2;
  const int64_t G = packed.size(0);
  TORCH_CHECK(packed.size(1) == Kp * nb * 32, "packed weight does not match K / nb");
  TORCH_CHECK(G * nb * 16 >= N && (G - 1) * nb * 16 < N, "packed weight does not match N");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous fp32 [N] tensor");
    bp = bias->data_ptr<float>();
  }
  if (K == 0) {  // empty reduction: y = bias
    y.zero_();
    TORCH_CHECK(bp == nullptr, "K == 0 with bias is not supported");
    return y;
  }
  const int16_t* W = reinterpret_cast<const int16_t*>(packed.data_ptr());
  const int16_t* xp = reinterpret_cast<const int16_t*>(x.data_ptr());
  int16_t* yp = reinterpret_cast<int16_t*>(y.data_ptr());
  const int64_t ldx = x.stride(0);
  // One contiguous range of groups per thread (OpenMP static split inside at::parallel_for).
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    switch (nb) {
      case 1: run_groups<1>(W, g0, g1, Kp, xp, M, ldx, bp, N, yp, N); break;
      case 2: run_groups<2>(W, g0, g1, Kp, xp, M, ldx, bp, N, yp, N); break;
      case 3: run_groups<3>(W, g0, g1, Kp, xp, M, ldx, bp, N, yp, N); break;
      default: run_groups<4>(W, g0, g1, Kp, xp, M, ldx, bp, N, yp, N); break;
    }
  });
  return y;
}

// Uninitialised uint8 buffer of nbytes; when `huge`, 2 MiB aligned and madvise(MADV_HUGEPAGE)
// before first touch, so streaming it costs fewer TLB misses (THP is "madvise" on most hosts).
at::Tensor alloc_buffer(int64_t nbytes, bool huge) {
  TORCH_CHECK(nbytes >= 0);
  const size_t align = huge ? (size_t(2) << 20) : 64;
  size_t n = std::max<size_t>(size_t(nbytes), 1);
  n = (n + align - 1) / align * align;
  void* p = std::aligned_alloc(align, n);
  TORCH_CHECK(p != nullptr, "allocation of ", n, " bytes failed");
  if (huge) (void)madvise(p, n, MADV_HUGEPAGE);
  return at::from_blob(p, {nbytes}, [](void* q) { std::free(q); },
                       at::TensorOptions().dtype(at::kByte));
}

// Streams a buffer (>= 256 bytes, 64-byte aligned size/addr not required) with 512-bit loads
// split over the torch threads; returns a checksum so the loads cannot be optimised away.
double read_buffer(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_contiguous());
  const char* p = reinterpret_cast<const char*>(buf.data_ptr());
  const int64_t nvec = buf.numel() * buf.element_size() / 256;
  std::vector<double> parts(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, nvec, 1 << 12, [&](int64_t a, int64_t b) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    const char* q = p + a * 256;
    for (int64_t i = a; i < b; ++i, q += 256) {
      s0 = _mm512_add_epi32(s0, _mm512_loadu_si512(q));
      s1 = _mm512_add_epi32(s1, _mm512_loadu_si512(q + 64));
      s2 = _mm512_add_epi32(s2, _mm512_loadu_si512(q + 128));
      s3 = _mm512_add_epi32(s3, _mm512_loadu_si512(q + 192));
    }
    s0 = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
    parts[at::get_thread_num()] += (double)_mm512_reduce_add_epi32(s0);
  });
  double t = 0;
  for (double v : parts) t += v;
  return t;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "bf16 packed small-M GEMM", pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("bias"), pybind11::arg("N"), pybind11::arg("nb"));
  m.def("alloc_buffer", &alloc_buffer);
  m.def("read_buffer", &read_buffer);
}
"""

CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def cpu_has_avx512_bf16() -> bool:
    """True when the CPU advertises avx512_bf16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    except OSError:
        pass
    return False


def _name() -> str:
    h = hashlib.sha256((CPP_SOURCE + " ".join(CFLAGS + LDFLAGS)).encode()).hexdigest()[:10]
    return f"splitserve_avx512_linear_{h}"


def load(verbose: bool = False):
    """The compiled module, or None when it can't be built/loaded here (reason in unavailable_reason())."""
    with _lock:
        if "mod" in _state:
            return _state["mod"]
        mod, reason = None, None
        if os.environ.get("SPLITSERVE_DISABLE_CPU_EXT", "") not in ("", "0"):
            reason = "disabled by SPLITSERVE_DISABLE_CPU_EXT"
        elif not cpu_has_avx512_bf16():
            reason = "CPU lacks avx512_bf16"
        else:
            try:
                from torch.utils import cpp_extension

                # Not load_inline: it prepends <torch/extension.h>, which triples the build time.
                name = _name()
                root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
                src_dir = os.path.join(root, name + "_src")
                os.makedirs(src_dir, exist_ok=True)
                src = os.path.join(src_dir, name + ".cpp")
                if not os.path.exists(src):
                    tmp = f"{src}.{os.getpid()}.tmp"
                    with open(tmp, "w") as f:
                        f.write(CPP_SOURCE)
                    os.replace(tmp, src)  # atomic: concurrent first users see a whole file
                mod = cpp_extension.load(
                    name=name,
                    sources=[src],
                    extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS,
                    verbose=verbose,
                )
            except Exception as e:  # no compiler/ninja, read-only cache dir, ...
                reason = f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("splitserve: AVX512-BF16 linear kernel unavailable (%s); using oneDNN/torch", reason)
        _state["mod"] = mod
        _state["reason"] = reason
        return mod


def unavailable_reason() -> str | None:
    load()
    return _state.get("reason")
