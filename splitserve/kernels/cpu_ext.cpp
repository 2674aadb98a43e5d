
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
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

// ---------------------------------------------------------------------------------------------
// Fused small ops for the decode step (bf16 or fp32, unit inner stride, any row strides):
// rms_norm / add_rms_norm, rotary (in place), silu_mul, paged decode attention.
// Elementwise ops reproduce torch's eager bf16 roundings (each torch op rounds its result to
// bf16), so they match the unfused model code bit for bit except for summation order.
// ---------------------------------------------------------------------------------------------
namespace fz {

using bf16_t = uint16_t;

template <typename T> struct Vec;
template <> struct Vec<float> {
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline __m512 loadm(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static inline void storem(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
  static inline __m512 rnd(__m512 v) { return v; }
};
template <> struct Vec<bf16_t> {
  static inline __m512 cvt(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static inline __m512 load(const bf16_t* p) { return cvt(_mm256_loadu_si256((const __m256i*)p)); }
  static inline __m512 loadm(const bf16_t* p, __mmask16 m) { return cvt(_mm256_maskz_loadu_epi16(m, p)); }
  static inline __m256i pack(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
  static inline void store(bf16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, pack(v)); }
  static inline void storem(bf16_t* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, pack(v)); }
  static inline __m512 rnd(__m512 v) { return cvt(pack(v)); }  // round to bf16 (RNE) and back
};

inline __mmask16 tmask(int64_t rem) { return rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1); }

template <typename T> inline __m512 ld(const T* p, int64_t rem) {
  return rem >= 16 ? Vec<T>::load(p) : Vec<T>::loadm(p, tmask(rem));
}
template <typename T> inline void st(T* p, int64_t rem, __m512 v) {
  if (rem >= 16) Vec<T>::store(p, v); else Vec<T>::storem(p, tmask(rem), v);
}

// exp(x) in fp32, ~1 ulp (Cephes expf polynomial), inf/0 beyond the range, NaN propagates.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(100.f), x);  // min/max return the 2nd operand on NaN
  x = _mm512_max_ps(_mm512_set1_ps(-100.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Row view of a 2-D [R, H] or 3-D [A, B, H] tensor with unit inner stride.
struct Rows {
  int64_t n, n1, s0, s1, H;
  inline int64_t off(int64_t r) const { return n1 == 1 ? r * s0 : (r / n1) * s0 + (r % n1) * s1; }
};
inline Rows rows_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, what, " must be 2-D or 3-D");
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) <= 1, what, " must have unit inner stride");
  if (t.dim() == 2) return {t.size(0), 1, t.stride(0), 0, t.size(1)};
  return {t.size(0) * t.size(1), t.size(1), t.stride(0), t.stride(1), t.size(2)};
}
inline int64_t grain_rows(int64_t row_elems, int64_t min_elems = 16384) {
  return std::max<int64_t>(1, min_elems / std::max<int64_t>(1, row_elems));
}

// ---- RMSNorm (optionally fused with the residual add) -----------------------------------------
// y = w * round(x * rsqrt(mean(x^2) + eps)); with ADD, x := round(res + x) is stored to res_out first.
template <typename T, bool ADD>
void norm_rows(const T* x, Rows xr, const T* res, Rows rr, const T* w, T* out, T* res_out, float eps) {
  const int64_t H = xr.H;
  at::parallel_for(0, xr.n, grain_rows(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xp = x + xr.off(r);
      T* op = out + r * H;
      const T* src = xp;
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      int64_t i = 0;
      if constexpr (ADD) {
        const T* rp = res + rr.off(r);
        T* ro = res_out + r * H;
        for (; i < H; i += 16) {
          const __m512 v = Vec<T>::rnd(_mm512_add_ps(ld(rp + i, H - i), ld(xp + i, H - i)));
          st(ro + i, H - i, v);
          s0 = _mm512_fmadd_ps(v, v, s0);
        }
        src = ro;
      } else {
        for (; i + 32 <= H; i += 32) {
          const __m512 a = Vec<T>::load(xp + i), b = Vec<T>::load(xp + i + 16);
          s0 = _mm512_fmadd_ps(a, a, s0);
          s1 = _mm512_fmadd_ps(b, b, s1);
        }
        for (; i < H; i += 16) {
          const __m512 a = ld(xp + i, H - i);
          s0 = _mm512_fmadd_ps(a, a, s0);
        }
      }
      const float ms = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)H;
      const __m512 k = _mm512_set1_ps(1.0f / std::sqrt(ms + eps));
      for (int64_t j = 0; j < H; j += 16) {
        const __m512 y = Vec<T>::rnd(_mm512_mul_ps(ld(src + j, H - j), k));
        st(op + j, H - j, _mm512_mul_ps(ld(w + j, H - j), y));
      }
    }
  });
}

// Entry points return None (nullopt) for inputs the kernels do not serve (device, dtype, rank), so
// the Python wrapper falls back to torch; malformed inputs (mismatched sizes) raise.
inline bool served(const at::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat);
}
inline at::Tensor unit_inner(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

c10::optional<at::Tensor> rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  if (!served(x_) || (x_.dim() != 2 && x_.dim() != 3) || w_.scalar_type() != x_.scalar_type() ||
      !w_.device().is_cpu() || w_.dim() != 1)
    return c10::nullopt;
  const at::Tensor x = unit_inner(x_), w = w_.contiguous();
  const Rows xr = rows_of(x, "x");
  TORCH_CHECK(w.size(0) == xr.H, "weight size ", w.size(0), " != hidden size ", xr.H);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<bf16_t, false>((const bf16_t*)x.data_ptr(), xr, nullptr, xr, (const bf16_t*)w.data_ptr(),
                             (bf16_t*)out.data_ptr(), nullptr, (float)eps);
  else
    norm_rows<float, false>(x.data_ptr<float>(), xr, nullptr, xr, w.data_ptr<float>(), out.data_ptr<float>(),
                            nullptr, (float)eps);
  return out;
}

c10::optional<std::tuple<at::Tensor, at::Tensor>> add_rms_norm(const at::Tensor& x_, const at::Tensor& r_,
                                                                const at::Tensor& w_, double eps) {
  if (!served(x_) || (x_.dim() != 2 && x_.dim() != 3) || w_.scalar_type() != x_.scalar_type() ||
      r_.scalar_type() != x_.scalar_type() || !r_.device().is_cpu() || !w_.device().is_cpu() || w_.dim() != 1)
    return c10::nullopt;
  TORCH_CHECK(x_.sizes() == r_.sizes(), "x and residual shapes differ");
  const at::Tensor x = unit_inner(x_), res = unit_inner(r_), w = w_.contiguous();
  const Rows xr = rows_of(x, "x"), rr = rows_of(res, "residual");
  TORCH_CHECK(w.size(0) == xr.H, "weight size ", w.size(0), " != hidden size ", xr.H);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor res_out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return std::make_tuple(out, res_out);
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<bf16_t, true>((const bf16_t*)x.data_ptr(), xr, (const bf16_t*)res.data_ptr(), rr,
                            (const bf16_t*)w.data_ptr(), (bf16_t*)out.data_ptr(), (bf16_t*)res_out.data_ptr(),
                            (float)eps);
  else
    norm_rows<float, true>(x.data_ptr<float>(), xr, res.data_ptr<float>(), rr, w.data_ptr<float>(),
                           out.data_ptr<float>(), res_out.data_ptr<float>(), (float)eps);
  return std::make_tuple(out, res_out);
}

// ---- SiLU(gate) * up --------------------------------------------------------------------------
template <typename T>
void silu_mul_rows(const T* x, Rows xr, T* out) {
  const int64_t I = xr.H / 2;
  at::parallel_for(0, xr.n, grain_rows(I, 8192), [&](int64_t r0, int64_t r1) {
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x80000000));
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = x + xr.off(r);
      const T* u = g + I;
      T* o = out + r * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 gv = ld(g + i, I - i);
        const __m512 e = exp512(_mm512_xor_ps(gv, sign));
        const __m512 s = Vec<T>::rnd(_mm512_div_ps(gv, _mm512_add_ps(one, e)));
        st(o + i, I - i, _mm512_mul_ps(s, ld(u + i, I - i)));
      }
    }
  });
}

c10::optional<at::Tensor> silu_mul(const at::Tensor& x_) {
  if (!served(x_) || (x_.dim() != 2 && x_.dim() != 3) || x_.size(-1) % 2) return c10::nullopt;
  const at::Tensor x = unit_inner(x_);
  const Rows xr = rows_of(x, "gate_up");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kBFloat16) silu_mul_rows<bf16_t>((const bf16_t*)x.data_ptr(), xr, (bf16_t*)out.data_ptr());
  else silu_mul_rows<float>(x.data_ptr<float>(), xr, out.data_ptr<float>());
  return out;
}

// ---- rotary (rotate-half), in place on q and k -----------------------------------------------
// out = round(round(x * cos) + round(rotate_half(x) * sin)), as torch's three bf16 ops.
template <typename T>
void rope_rows(T* q, int64_t Hq, int64_t qs0, int64_t qs1, T* k, int64_t Hk, int64_t ks0, int64_t ks1,
               const T* cs, int64_t cs0, const T* sn, int64_t ss0, const int64_t* pos, int64_t Tn, int64_t D) {
  const int64_t half = D / 2, H = Hq + Hk;
  at::parallel_for(0, Tn * H, grain_rows(D, 8192), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H, hh = r % H;
      T* x = hh < Hq ? q + t * qs0 + hh * qs1 : k + t * ks0 + (hh - Hq) * ks1;
      const int64_t pr = pos ? pos[t] : t;
      const T* c = cs + pr * cs0;
      const T* s = sn + pr * ss0;
      for (int64_t i = 0; i < half; i += 16) {
        const int64_t rem = half - i;
        const __m512 x1 = ld(x + i, rem), x2 = ld(x + half + i, rem);
        const __m512 a1 = Vec<T>::rnd(_mm512_mul_ps(x1, ld(c + i, rem)));
        const __m512 b1 = Vec<T>::rnd(_mm512_mul_ps(x2, ld(s + i, rem)));
        const __m512 a2 = Vec<T>::rnd(_mm512_mul_ps(x2, ld(c + half + i, rem)));
        const __m512 b2 = Vec<T>::rnd(_mm512_mul_ps(x1, ld(s + half + i, rem)));
        st(x + i, rem, _mm512_sub_ps(a1, b1));
        st(x + half + i, rem, _mm512_add_ps(a2, b2));
      }
    }
  });
}

// In place on q [T, Hq, D] and k [T, Hk, D]; cos/sin [T, D], or full tables [P, D] indexed by
// positions [T] when given. Returns false (nothing done) for inputs it does not serve.
bool apply_rotary(at::Tensor q, at::Tensor k, const at::Tensor& cos_, const at::Tensor& sin_,
                  const c10::optional<at::Tensor>& positions) {
  if (!served(q) || q.dim() != 3 || k.dim() != 3 || cos_.dim() != 2 || sin_.dim() != 2 ||
      k.scalar_type() != q.scalar_type() || cos_.scalar_type() != q.scalar_type() ||
      sin_.scalar_type() != q.scalar_type() || !k.device().is_cpu() || !cos_.device().is_cpu() ||
      !sin_.device().is_cpu() || q.stride(2) != 1 || k.stride(2) != 1)
    return false;
  const bool has_pos = positions.has_value() && positions->defined();
  if (has_pos && (!positions->device().is_cpu() || positions->dim() != 1 ||
                  (positions->scalar_type() != at::kLong && positions->scalar_type() != at::kInt)))
    return false;
  const at::Tensor cos = unit_inner(cos_), sin = unit_inner(sin_);
  const int64_t Tn = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == Tn && k.size(2) == D && cos.size(1) == D && sin.size(1) == D && D % 2 == 0 &&
              cos.size(0) == sin.size(0), "rotary shapes do not match");
  std::vector<int64_t> rows(has_pos ? Tn : 0);
  if (has_pos) {
    TORCH_CHECK(positions->size(0) == Tn, "positions must be [T]");
    const at::Tensor p = positions->contiguous();
    for (int64_t t = 0; t < Tn; ++t) {
      const int64_t v = p.scalar_type() == at::kLong ? p.data_ptr<int64_t>()[t] : (int64_t)p.data_ptr<int32_t>()[t];
      TORCH_CHECK(v >= 0 && v < cos.size(0), "position ", v, " outside the rotary table");
      rows[t] = v;
    }
  } else {
    TORCH_CHECK(cos.size(0) == Tn, "cos/sin must be [T, D] without positions");
  }
  if (Tn == 0 || D == 0) return true;
  const int64_t* rp = has_pos ? rows.data() : nullptr;
  if (q.scalar_type() == at::kBFloat16)
    rope_rows<bf16_t>((bf16_t*)q.data_ptr(), q.size(1), q.stride(0), q.stride(1), (bf16_t*)k.data_ptr(), k.size(1),
                      k.stride(0), k.stride(1), (const bf16_t*)cos.data_ptr(), cos.stride(0),
                      (const bf16_t*)sin.data_ptr(), sin.stride(0), rp, Tn, D);
  else
    rope_rows<float>(q.data_ptr<float>(), q.size(1), q.stride(0), q.stride(1), k.data_ptr<float>(), k.size(1),
                     k.stride(0), k.stride(1), cos.data_ptr<float>(), cos.stride(0), sin.data_ptr<float>(),
                     sin.stride(0), rp, Tn, D);
  return true;
}

// k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t] (rows of [H, D]); false if not served.
bool write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor kc, at::Tensor vc, const at::Tensor& slots) {
  if (!served(k) || k.dim() != 3 || v.dim() != 3 || kc.dim() != 3 || vc.dim() != 3 ||
      v.scalar_type() != k.scalar_type() || kc.scalar_type() != k.scalar_type() ||
      vc.scalar_type() != k.scalar_type() || !v.device().is_cpu() || !kc.device().is_cpu() ||
      !vc.device().is_cpu() || !slots.device().is_cpu() || slots.dim() != 1 ||
      (slots.scalar_type() != at::kLong && slots.scalar_type() != at::kInt))
    return false;
  const int64_t Tn = k.size(0), H = k.size(1), D = k.size(2), S = kc.size(0);
  TORCH_CHECK(v.size(0) == Tn && v.size(1) == H && v.size(2) == D && kc.size(1) == H && kc.size(2) == D &&
              vc.size(0) == S && vc.size(1) == H && vc.size(2) == D && slots.size(0) == Tn, "write_kv shapes do not match");
  // row-wise copies need [H, D] contiguous per token on every side
  auto rowc = [&](const at::Tensor& t) { return t.stride(2) == 1 && (H == 1 || t.stride(1) == D); };
  if (!rowc(k) || !rowc(v) || !rowc(kc) || !rowc(vc)) return false;
  const int64_t es = k.element_size(), rb = H * D * es;
  const char* kp = (const char*)k.data_ptr();
  const char* vp = (const char*)v.data_ptr();
  char* kcp = (char*)kc.data_ptr();
  char* vcp = (char*)vc.data_ptr();
  for (int64_t t = 0; t < Tn; ++t) {
    const int64_t s = slots.scalar_type() == at::kLong ? slots.data_ptr<int64_t>()[t * slots.stride(0)]
                                                       : (int64_t)slots.data_ptr<int32_t>()[t * slots.stride(0)];
    TORCH_CHECK(s >= 0 && s < S, "slot ", s, " outside the cache");
    std::memcpy(kcp + s * kc.stride(0) * es, kp + t * k.stride(0) * es, rb);
    std::memcpy(vcp + s * vc.stride(0) * es, vp + t * v.stride(0) * es, rb);
  }
  return true;
}

// ---- paged decode attention ------------------------------------------------------------------
constexpr int MAXG = 32;    // query heads per KV head
constexpr int MAXD = 256;   // head_dim
constexpr int TB = 16;      // tokens per score vector
constexpr int CH = 256;     // tokens per softmax chunk

// 16 vectors -> one vector whose lane i is the horizontal sum of v[i].
inline __m512 hsum16(const __m512* v) {
  __m512 w[8], x[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// scores of one query row against n (<= 16) key rows; D split into NC chunks of 32 elements.
template <typename T, int NC>
inline __m512 qk_block(const T* qrow, const T* const* kp, int n, int64_t D) {
  __m512 sc[TB];
  if constexpr (std::is_same<T, bf16_t>::value) {
    __m512i qv[NC];
    __mmask32 lm = (D % 32) ? (__mmask32)((1u << (D % 32)) - 1) : (__mmask32)0xFFFFFFFFu;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) qv[c] = _mm512_maskz_loadu_epi16(c == NC - 1 ? lm : (__mmask32)0xFFFFFFFFu, qrow + 32 * c);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      __m512 a = _mm512_setzero_ps();
      if (t < n) {
        const bf16_t* kr = kp[t];
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) {
          const __m512i kv = c == NC - 1 ? _mm512_maskz_loadu_epi16(lm, kr + 32 * c) : _mm512_loadu_si512(kr + 32 * c);
          a = _mm512_dpbf16_ps(a, (__m512bh)qv[c], (__m512bh)kv);
        }
      }
      sc[t] = a;
    }
  } else {
    __m512 qv[2 * NC];
#pragma GCC unroll 16
    for (int c = 0; c < 2 * NC; ++c) qv[c] = _mm512_maskz_loadu_ps(tmask(D - 16 * c > 0 ? D - 16 * c : 0), qrow + 16 * c);
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      __m512 a = _mm512_setzero_ps();
      if (t < n) {
        const float* kr = kp[t];
#pragma GCC unroll 16
        for (int c = 0; c < 2 * NC; ++c) {
          const int64_t rem = D - 16 * c;
          const __m512 kv = rem >= 16 ? _mm512_loadu_ps(kr + 16 * c) : _mm512_maskz_loadu_ps(tmask(rem > 0 ? rem : 0), kr + 16 * c);
          a = _mm512_fmadd_ps(qv[c], kv, a);
        }
      }
      sc[t] = a;
    }
  }
  return hsum16(sc);
}

// acc[g][j0 : j0 + 16*JC] += sum_t p[g][t] * v_t[j0 : j0 + 16*JC] for GT query heads (p rows CH
// apart). GT*JC independent accumulator chains (x2 token parities when GT*JC <= 8) keep both FMA
// pipes busy. FULL: no masking (all JC chunks of 16 are whole).
template <typename T, int GT, int JC, bool FULL>
inline void pv_span(float* acc, int64_t DP, const float* p, const T* const* vp, int n, int64_t j0, int64_t rem) {
  constexpr int P = GT * JC <= 8 ? 2 : 1;
  __mmask16 mk[JC];
#pragma GCC unroll 4
  for (int jj = 0; jj < JC; ++jj) mk[jj] = tmask(std::max<int64_t>(0, rem - 16 * jj));
  __m512 a[P][GT][JC];
#pragma GCC unroll 2
  for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g)
#pragma GCC unroll 4
      for (int jj = 0; jj < JC; ++jj)
        a[q][g][jj] = q == 0 ? _mm512_load_ps(acc + g * DP + j0 + 16 * jj) : _mm512_setzero_ps();
  int t = 0;
  for (; t + P <= n; t += P) {
#pragma GCC unroll 2
    for (int q = 0; q < P; ++q) {
      const T* vr = vp[t + q] + j0;
      __m512 v[JC];
#pragma GCC unroll 4
      for (int jj = 0; jj < JC; ++jj) v[jj] = FULL ? Vec<T>::load(vr + 16 * jj) : Vec<T>::loadm(vr + 16 * jj, mk[jj]);
#pragma GCC unroll 8
      for (int g = 0; g < GT; ++g) {
        const __m512 pb = _mm512_set1_ps(p[g * CH + t + q]);
#pragma GCC unroll 4
        for (int jj = 0; jj < JC; ++jj) a[q][g][jj] = _mm512_fmadd_ps(pb, v[jj], a[q][g][jj]);
      }
    }
  }
  if (P == 2 && t < n) {  // odd tail
    const T* vr = vp[t] + j0;
    __m512 v[JC];
#pragma GCC unroll 4
    for (int jj = 0; jj < JC; ++jj) v[jj] = FULL ? Vec<T>::load(vr + 16 * jj) : Vec<T>::loadm(vr + 16 * jj, mk[jj]);
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g) {
      const __m512 pb = _mm512_set1_ps(p[g * CH + t]);
#pragma GCC unroll 4
      for (int jj = 0; jj < JC; ++jj) a[0][g][jj] = _mm512_fmadd_ps(pb, v[jj], a[0][g][jj]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 4
    for (int jj = 0; jj < JC; ++jj) {
      __m512 r = a[0][g][jj];
      if constexpr (P == 2) r = _mm512_add_ps(r, a[1][g][jj]);
      _mm512_store_ps(acc + g * DP + j0 + 16 * jj, r);
    }
}

template <typename T, int GT>
inline void pv_tile(float* acc, int64_t DP, const float* p, const T* const* vp, int n, int64_t D) {
  int64_t j0 = 0;
  for (; j0 + 64 <= D; j0 += 64) pv_span<T, GT, 4, true>(acc, DP, p, vp, n, j0, 64);
  const int64_t rem = D - j0;
  if (rem == 0) return;
  if (rem == 32) pv_span<T, GT, 2, true>(acc, DP, p, vp, n, j0, rem);
  else if (rem <= 16) pv_span<T, GT, 1, false>(acc, DP, p, vp, n, j0, rem);
  else if (rem <= 32) pv_span<T, GT, 2, false>(acc, DP, p, vp, n, j0, rem);
  else pv_span<T, GT, 4, false>(acc, DP, p, vp, n, j0, rem);
}

template <typename T>
inline void pv(float* acc, int64_t DP, const float* p, const T* const* vp, int n, int64_t D, int64_t G) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) pv_tile<T, 4>(acc + g * DP, DP, p + g * CH, vp, n, D);
  switch (G - g) {
    case 1: pv_tile<T, 1>(acc + g * DP, DP, p + g * CH, vp, n, D); break;
    case 2: pv_tile<T, 2>(acc + g * DP, DP, p + g * CH, vp, n, D); break;
    case 3: pv_tile<T, 3>(acc + g * DP, DP, p + g * CH, vp, n, D); break;
    default: break;
  }
}


// Paged K/V rows defeat the hardware prefetchers (a new stream every block). Prefetching into
// L2 (T1) a few blocks ahead is 1.5x faster when the cache comes from DRAM (as in a decode step,
// where the weights stream through the L3 between layers) and ~6% slower when it is L3-resident;
// into L1 (T0) it is slower either way (the chunk's K and V rows evict each other).
template <int HINT>
inline void prefetch_row(const void* r, int64_t bytes) {
  const char* p = (const char*)r;
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, (enum _mm_hint)HINT);
}

struct AttnCtx {
  const void *q, *kc, *vc;
  void* out;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1, os0, os1;
  const int32_t* bt32;
  const int64_t* bt64;
  int64_t bts0, bts1, max_blocks, bs;
  int64_t G, D, DP;
  float scale;
  inline int64_t block(int64_t b, int64_t j) const {
    return bt32 ? (int64_t)bt32[b * bts0 + j * bts1] : bt64[b * bts0 + j * bts1];
  }
};

struct Item { int64_t b, h, t0, t1, s, ns, part; };  // split s of ns; part: scratch slot (-1: none)

// One (request, kv head, token range). Chunks of CH tokens: all scores of the chunk (QK), then
// softmax over the chunk (rescaling the running sums when the max grows), then P@V.
// Writes the normalised output (part == nullptr) or (m, l, acc) per query head into part.
template <typename T, int NC>
void attn_item(const AttnCtx& c, const Item& it, float* part) {
  constexpr int PF = 32;  // tokens
  const int64_t G = c.G, D = c.D, DP = c.DP, rowb = D * (int64_t)sizeof(T);
  alignas(64) float acc[MAXG * MAXD];
  alignas(64) float sb[MAXG * CH];
  float m[MAXG], l[MAXG];
  const T* kp[CH];
  const T* vp[CH];
  for (int64_t i = 0; i < G * DP; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; }
  const T* q0 = (const T*)c.q + it.b * c.qs0 + it.h * G * c.qs1;
  const T* kc = (const T*)c.kc + it.h * c.ks1;
  const T* vc = (const T*)c.vc + it.h * c.vs1;
  const int64_t bs = c.bs, ks0 = c.ks0, vs0 = c.vs0;
  int64_t blk = it.t0 / bs, off = it.t0 % bs;
  int64_t base = it.t1 > it.t0 ? c.block(it.b, blk) * bs : 0;
  const __m512 scale = _mm512_set1_ps(c.scale);
  for (int64_t c0 = it.t0; c0 < it.t1; c0 += CH) {
    const int n = (int)std::min<int64_t>(CH, it.t1 - c0);
    for (int i = 0; i < n;) {  // row pointers, one block-table lookup per run of slots
      const int run = (int)std::min<int64_t>(n - i, bs - off);
      const T* kr = kc + (base + off) * ks0;
      const T* vr = vc + (base + off) * vs0;
      for (int r = 0; r < run; ++r, kr += ks0, vr += vs0) {
        kp[i + r] = kr;
        vp[i + r] = vr;
      }
      i += run;
      off += run;
      if (off == bs) {
        off = 0;
        ++blk;
        base = (c0 + i < it.t1) ? c.block(it.b, blk) * bs : 0;
      }
    }
    for (int i = 0; i < std::min(PF, n); ++i) prefetch_row<_MM_HINT_T0>(kp[i], rowb);
    // scores
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = q0 + g * c.qs1;
      float* sg = sb + g * CH;
      for (int tb = 0; tb < n; tb += TB) {
        const int nb = std::min(TB, n - tb);
        if (g == 0) {  // K rows PF tokens ahead, V rows for the P@V pass after the scores
          for (int i = tb + PF; i < std::min(tb + PF + TB, n); ++i) prefetch_row<_MM_HINT_T1>(kp[i], rowb);
          for (int i = tb; i < tb + nb; ++i) prefetch_row<_MM_HINT_T1>(vp[i], rowb);
        }
        _mm512_store_ps(sg + tb, _mm512_mul_ps(qk_block<T, NC>(qg, kp + tb, nb, D), scale));
      }
    }
    // softmax over the chunk, merged into the running (m, l, acc)
    const int npad = (n + TB - 1) / TB * TB;
    const __mmask16 last = tmask(n - (npad - TB));
    for (int64_t g = 0; g < G; ++g) {
      float* sg = sb + g * CH;
      const __m512 ninf = _mm512_set1_ps(-INFINITY);
      __m512 mx = ninf;
      for (int i = 0; i < npad; i += TB)
        mx = _mm512_max_ps(mx, i + TB < npad ? _mm512_load_ps(sg + i) : _mm512_mask_load_ps(ninf, last, sg + i));
      const float cm = _mm512_reduce_max_ps(mx);
      if (cm > m[g]) {
        const float alpha = m[g] == -INFINITY ? 0.f : std::exp(m[g] - cm);
        const __m512 av = _mm512_set1_ps(alpha);
        for (int64_t j = 0; j < DP; j += 16)
          _mm512_store_ps(acc + g * DP + j, _mm512_mul_ps(av, _mm512_load_ps(acc + g * DP + j)));
        l[g] *= alpha;
        m[g] = cm;
      }
      const __m512 mv = _mm512_set1_ps(m[g]);
      __m512 sum = _mm512_setzero_ps();
      for (int i = 0; i < npad; i += TB) {
        __m512 pv_ = exp512(_mm512_sub_ps(_mm512_load_ps(sg + i), mv));
        if (i + TB >= npad) pv_ = _mm512_maskz_mov_ps(last, pv_);
        _mm512_store_ps(sg + i, pv_);
        sum = _mm512_add_ps(sum, pv_);
      }
      l[g] += _mm512_reduce_add_ps(sum);
    }
    pv<T>(acc, DP, sb, vp, n, D, G);
  }
  if (part == nullptr) {
    for (int64_t g = 0; g < G; ++g) {
      T* o = (T*)c.out + it.b * c.os0 + (it.h * G + g) * c.os1;
      const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
      for (int64_t j = 0; j < D; j += 16) st(o + j, D - j, _mm512_mul_ps(_mm512_load_ps(acc + g * DP + j), inv));
    }
  } else {
    const int64_t ps = DP + 16;
    for (int64_t g = 0; g < G; ++g) {
      float* pg = part + g * ps;
      pg[0] = m[g];
      pg[1] = l[g];
      std::memcpy(pg + 16, acc + g * DP, DP * sizeof(float));
    }
  }
}

template <typename T>
void combine(const AttnCtx& c, const Item& it, const float* parts) {
  const int64_t G = c.G, D = c.D, DP = c.DP, ps = DP + 16, is = G * ps;
  for (int64_t g = 0; g < G; ++g) {
    float M = -INFINITY;
    for (int64_t s = 0; s < it.ns; ++s) M = std::max(M, parts[s * is + g * ps]);
    alignas(64) float acc[MAXD];
    for (int64_t j = 0; j < DP; j += 16) _mm512_store_ps(acc + j, _mm512_setzero_ps());
    float L = 0.f;
    for (int64_t s = 0; s < it.ns; ++s) {
      const float* pg = parts + s * is + g * ps;
      if (pg[1] <= 0.f) continue;
      const float w = std::exp(pg[0] - M);
      L += w * pg[1];
      const __m512 wv = _mm512_set1_ps(w);
      for (int64_t j = 0; j < DP; j += 16)
        _mm512_store_ps(acc + j, _mm512_fmadd_ps(wv, _mm512_loadu_ps(pg + 16 + j), _mm512_load_ps(acc + j)));
    }
    T* o = (T*)c.out + it.b * c.os0 + (it.h * G + g) * c.os1;
    const __m512 inv = _mm512_set1_ps(L > 0.f ? 1.f / L : 0.f);
    for (int64_t j = 0; j < D; j += 16) st(o + j, D - j, _mm512_mul_ps(_mm512_load_ps(acc + j), inv));
  }
}

template <typename T>
void attn_run(const AttnCtx& c, const std::vector<Item>& items, int64_t nthreads) {
  const int64_t NC = (c.D + 31) / 32;
  void (*fn)(const AttnCtx&, const Item&, float*) = nullptr;
  switch (NC) {
    case 1: fn = attn_item<T, 1>; break;
    case 2: fn = attn_item<T, 2>; break;
    case 3: fn = attn_item<T, 3>; break;
    case 4: fn = attn_item<T, 4>; break;
    case 5: fn = attn_item<T, 5>; break;
    case 6: fn = attn_item<T, 6>; break;
    case 7: fn = attn_item<T, 7>; break;
    default: fn = attn_item<T, 8>; break;
  }
  int64_t nparts = 0;
  for (const Item& it : items) if (it.ns > 1) nparts = std::max(nparts, it.part + 1);
  const int64_t is = c.G * (c.DP + 16);
  std::vector<float> parts(nparts * is);
  const int64_t n = (int64_t)items.size();
  // Dynamic schedule: one task per thread pulls items; the last split of a (b, h) to finish combines.
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[n]);
  for (int64_t i = 0; i < n; ++i) done[i].store(0, std::memory_order_relaxed);
  auto work = [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      const Item& it = items[i];
      if (it.ns == 1) { fn(c, it, nullptr); continue; }
      fn(c, it, parts.data() + it.part * is);
      const int64_t first = i - it.s;  // the (b, h)'s splits are consecutive items
      if (done[first].fetch_add(1, std::memory_order_acq_rel) == it.ns - 1) {
        combine<T>(c, items[first], parts.data() + items[first].part * is);
      }
    }
  };
  const int64_t nt = std::min<int64_t>(nthreads, n);
  if (nt <= 1) work(0, 1);
  else at::parallel_for(0, nt, 1, work);
}

// q [B, Hq, D]; k/v cache [S, Hk, D]; block_tables [B, max_blocks] int32/int64; context_lens [B].
// split_tokens: tokens per work item (0 = auto, < 0 = never split).
c10::optional<at::Tensor> paged_decode_attention(const at::Tensor& q_, const at::Tensor& kc_, const at::Tensor& vc_,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t bs,
                                  double scale, const c10::optional<at::Tensor>& out_opt, int64_t split_tokens) {
  if (!served(q_) || q_.dim() != 3 || kc_.dim() != 3 || vc_.dim() != 3 || kc_.scalar_type() != q_.scalar_type() ||
      vc_.scalar_type() != q_.scalar_type() || !kc_.device().is_cpu() || !vc_.device().is_cpu() ||
      !block_tables.device().is_cpu() || !context_lens.device().is_cpu() || kc_.size(1) == 0 ||
      q_.size(1) % kc_.size(1) != 0 || q_.size(1) / kc_.size(1) > MAXG || q_.size(2) > MAXD || q_.size(2) == 0)
    return c10::nullopt;
  const at::Tensor q = unit_inner(q_), kc = unit_inner(kc_), vc = unit_inner(vc_);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), S = kc.size(0), Hk = kc.size(1);
  TORCH_CHECK(kc.size(2) == D && vc.size(2) == D && vc.size(1) == Hk && vc.size(0) == S, "cache shapes do not match q");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, "block_tables must be [B, max_blocks]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt || block_tables.scalar_type() == at::kLong, "int block_tables");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, "context_lens must be [B]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt || context_lens.scalar_type() == at::kLong, "int context_lens");
  TORCH_CHECK(bs >= 1, "block_size must be >= 1");
  const bool bf = q.scalar_type() == at::kBFloat16;
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == Hq && out.size(2) == D &&
                out.scalar_type() == q.scalar_type() && out.stride(2) == 1, "out must be [B, Hq, D] of q's dtype");
  } else {
    out = at::empty({B, Hq, D}, q.options());
  }
  if (B == 0) return out;
  AttnCtx c;
  c.q = q.data_ptr(); c.kc = kc.data_ptr(); c.vc = vc.data_ptr(); c.out = out.data_ptr();
  c.qs0 = q.stride(0); c.qs1 = q.stride(1); c.ks0 = kc.stride(0); c.ks1 = kc.stride(1);
  c.vs0 = vc.stride(0); c.vs1 = vc.stride(1); c.os0 = out.stride(0); c.os1 = out.stride(1);
  c.bt32 = block_tables.scalar_type() == at::kInt ? block_tables.data_ptr<int32_t>() : nullptr;
  c.bt64 = block_tables.scalar_type() == at::kLong ? block_tables.data_ptr<int64_t>() : nullptr;
  c.bts0 = block_tables.stride(0); c.bts1 = block_tables.stride(1); c.max_blocks = block_tables.size(1);
  c.bs = bs; c.G = Hq / Hk; c.D = D; c.DP = (D + 15) / 16 * 16; c.scale = (float)scale;
  // Validate lengths and block ids up front (the parallel part does no checks).
  std::vector<int64_t> lens(B);
  int64_t total = 0, maxlen = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = context_lens.scalar_type() == at::kInt ? (int64_t)context_lens.data_ptr<int32_t>()[b * context_lens.stride(0)]
                                                           : context_lens.data_ptr<int64_t>()[b * context_lens.stride(0)];
    TORCH_CHECK(L >= 0 && L <= c.max_blocks * bs, "context_lens[", b, "] = ", L, " out of range for the block table");
    for (int64_t j = 0; j * bs < L; ++j) {
      const int64_t id = c.block(b, j), used = std::min(bs, L - j * bs);
      TORCH_CHECK(id >= 0 && id * bs + used <= S, "block_tables[", b, ", ", j, "] = ", id, " outside the cache");
    }
    lens[b] = L;
    total += L;
    maxlen = std::max(maxlen, L);
  }
  const int64_t nthreads = at::get_num_threads();
  // A single thread for tiny problems: the fork/join costs more than it saves.
  const int64_t nt = total * Hq * D < (1 << 16) ? 1 : nthreads;
  // Work items are (request, kv head, token range), pulled dynamically by the threads. When the
  // B*Hk (request, head) pairs do not spread evenly over the threads (B=1: 3 heads on 2 threads),
  // split each context into the fewest ranges that make the item count a multiple of the threads.
  int64_t ch = INT64_MAX;
  if (split_tokens > 0) {
    ch = split_tokens;
  } else if (split_tokens == 0 && nt > 1 && B * Hk < 8 * nt && (B * Hk) % nt != 0) {
    const int64_t ns = nt / std::gcd(B * Hk, nt);
    ch = std::max<int64_t>(32, (maxlen + ns - 1) / ns);
  }
  std::vector<Item> items;
  items.reserve(B * Hk);
  int64_t part = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens[b];
    const int64_t ns = L > ch ? (L + ch - 1) / ch : 1;
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t s = 0; s < ns; ++s) {
        items.push_back({b, h, L * s / ns, L * (s + 1) / ns, s, ns, ns > 1 ? part++ : -1});
      }
    }
  }
  if (bf) attn_run<bf16_t>(c, items, nt);
  else attn_run<float>(c, items, nt);
  return out;
}

}  // namespace fz

// Copy with non-temporal (streaming) stores: for bytes the writing process will not read back (a
// request's KV written into another process's cache), so the destination lines are never read
// for ownership. Memory traffic 2x the bytes instead of 3x.
static void stream_bytes(char* d, const char* s, size_t n) {
  size_t head = (64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63;
  if (head > n) head = n;
  std::memcpy(d, s, head);
  d += head; s += head; n -= head;
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    __m512i a = _mm512_loadu_si512(s + i);
    __m512i b = _mm512_loadu_si512(s + i + 64);
    __m512i c = _mm512_loadu_si512(s + i + 128);
    __m512i e = _mm512_loadu_si512(s + i + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i + 192), e);
  }
  std::memcpy(d + i, s + i, n - i);
}

void copy_stream(at::Tensor dst, const at::Tensor& src) {
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "copy_stream: CPU tensors only");
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy_stream: contiguous tensors only");
  TORCH_CHECK(dst.nbytes() == src.nbytes(), "copy_stream: sizes differ");
  stream_bytes(static_cast<char*>(dst.data_ptr()), static_cast<const char*>(src.data_ptr()), dst.nbytes());
  _mm_sfence();  // streaming stores are weakly ordered: visible before the notice that follows
}

// Many runs of rows in one call (a request's KV scattered over blocks): dst[d:d+n] = src[s:s+n]
// for each (s, d, n) row of `runs`. Rows are dim 0; both tensors contiguous, same row size.
void copy_rows(at::Tensor dst, const at::Tensor& src, const at::Tensor& runs) {
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "copy_rows: CPU tensors only");
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy_rows: contiguous tensors only");
  TORCH_CHECK(dst.dim() >= 1 && src.dim() >= 1, "copy_rows: tensors need a row dimension");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "copy_rows: dtypes differ");
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 3 &&
              runs.is_contiguous(),
              "copy_rows: runs must be an int64 [n, 3] tensor");
  const int64_t dn = dst.size(0), sn = src.size(0);
  const size_t row = dn ? dst.nbytes() / dn : 0;
  TORCH_CHECK(sn == 0 || src.nbytes() / sn == row, "copy_rows: row sizes differ");
  const int64_t* r = runs.data_ptr<int64_t>();
  char* d = static_cast<char*>(dst.data_ptr());
  const char* s = static_cast<const char*>(src.data_ptr());
  for (int64_t i = 0; i < runs.size(0); ++i) {
    const int64_t a = r[3 * i], b = r[3 * i + 1], n = r[3 * i + 2];
    TORCH_CHECK(n >= 0 && a >= 0 && b >= 0 && a + n <= sn && b + n <= dn, "copy_rows: run ", i, " out of range");
  }
  for (int64_t i = 0; i < runs.size(0); ++i)
    stream_bytes(d + r[3 * i + 1] * row, s + r[3 * i] * row, r[3 * i + 2] * row);
  _mm_sfence();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_stream", &copy_stream);
  m.def("copy_rows", &copy_rows);
  m.def("gemm", &gemm, "bf16 packed small-M GEMM", pybind11::arg("x"), pybind11::arg("packed"),
        pybind11::arg("bias"), pybind11::arg("N"), pybind11::arg("nb"));
  m.def("alloc_buffer", &alloc_buffer);
  m.def("read_buffer", &read_buffer);
  // fused decode ops (see splitserve/kernels/fused.py for the Python API and fallbacks)
  m.def("rms_norm", &fz::rms_norm);
  m.def("add_rms_norm", &fz::add_rms_norm);
  m.def("silu_mul", &fz::silu_mul);
  m.def("apply_rotary", &fz::apply_rotary);
  m.def("write_kv", &fz::write_kv);
  m.def("paged_decode_attention", &fz::paged_decode_attention, pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("block_tables"), pybind11::arg("context_lens"),
        pybind11::arg("block_size"), pybind11::arg("scale"), pybind11::arg("out"), pybind11::arg("split_tokens"));
}
