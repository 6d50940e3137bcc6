// Fused bottleneck adapter for effir: y = x + s * (act(x Wd^T + bd) Wu^T + bu), optionally followed by the
// encoder's residual + LayerNorm (two placements, see the contract in effir/ops/bottleneck_adapter.py).
// One CTA owns TM tokens: their rows are read from global memory once into shared memory, the r-wide
// intermediate never leaves the chip, and each output row is written once, coalesced. Backward recomputes
// the intermediate from x; the token reductions for the weight gradients run as cuBLAS GEMMs over
// r-wide per-token tensors the kernel writes (deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "common.cuh"

namespace effir {
namespace {

constexpr int NTHR = 256;
constexpr int NWARP = NTHR / 32;
constexpr int TM_MAX = 16;
enum Act : int { RELU = 0, GELU = 1, SILU = 2 };
enum Mode : int { PLAIN = 0, LN_AFTER = 1, LN_BEFORE = 2 };  // LN_BEFORE == original_ln_before=True

template <typename A> __device__ __forceinline__ A act_f(A u, int act) {
  if (act == RELU) return u > A(0) ? u : A(0);
  if constexpr (std::is_same_v<A, float>) {
    if (act == GELU) return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
    return u / (1.f + expf(-u));
  } else {
    if (act == GELU) return 0.5 * u * (1.0 + erf(u * 0.70710678118654752));
    return u / (1.0 + exp(-u));
  }
}
template <typename A> __device__ __forceinline__ A act_df(A u, int act) {
  if (act == RELU) return u > A(0) ? A(1) : A(0);  // torch's threshold_backward: 0 at u == 0
  if constexpr (std::is_same_v<A, float>) {
    if (act == GELU)
      return 0.5f * (1.f + erff(u * 0.70710678118654752f)) + u * expf(-0.5f * u * u) * 0.39894228040143268f;
    const float sg = 1.f / (1.f + expf(-u));
    return sg * (1.f + u * (1.f - sg));
  } else {
    if (act == GELU) return 0.5 * (1.0 + erf(u * 0.70710678118654752)) + u * exp(-0.5 * u * u) * 0.39894228040143268;
    const double sg = 1.0 / (1.0 + exp(-u));
    return sg * (1.0 + u * (1.0 - sg));
  }
}
template <typename A> __device__ __forceinline__ A rsqrt_acc(A v) {
  if constexpr (std::is_same_v<A, float>) return 1.f / sqrtf(v);  // not rsqrtf: full precision
  else return 1.0 / sqrt(v);
}

// C = A (rows x K) . B (K x N) for the CTA's 16-token tile, one warp per n8 column tile (nt = warp, warp + 8,
// ...), in the m16n8k16 C-fragment layout: lane 4g + t holds rows g, g + 8 and columns 2t, 2t + 1.
// la(row, k) / lb(k, col) return operands in the accumulation type, zero outside the matrices; epi(row, col, v)
// consumes each result. fp16/bf16: operands rounded to T (the reference rounds its intermediates the same way)
// and multiplied on the tensor cores (mma.sync, fp32 accumulation). fp32/fp64: the same layout with exact FMAs.
template <typename T, typename LA, typename LB, typename EPI>
__device__ __forceinline__ void warp_gemm16(int K, int N, LA la, LB lb, EPI epi) {
  using A = acc_t<T>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int n0 = warp * 8; n0 < N; n0 += NWARP * 8) {
    A c[4] = {A(0), A(0), A(0), A(0)};
    if constexpr (is_16bit_v<T>) {
      for (int k0 = 0; k0 < K; k0 += 16) {
        const int k = k0 + 2 * t;
        uint32_t a[4];
        a[0] = pack2<T>(la(g, k), la(g, k + 1));
        a[1] = pack2<T>(la(g + 8, k), la(g + 8, k + 1));
        a[2] = pack2<T>(la(g, k + 8), la(g, k + 9));
        a[3] = pack2<T>(la(g + 8, k + 8), la(g + 8, k + 9));
        const uint32_t b0 = pack2<T>(lb(k, n0 + g), lb(k + 1, n0 + g));
        const uint32_t b1 = pack2<T>(lb(k + 8, n0 + g), lb(k + 9, n0 + g));
        mma16816<T>(c, a, b0, b1);
      }
    } else {
      for (int k = 0; k < K; ++k) {
        const A a0 = la(g, k), a1 = la(g + 8, k), b0 = lb(k, n0 + 2 * t), b1 = lb(k, n0 + 2 * t + 1);
        c[0] += a0 * b0;
        c[1] += a0 * b1;
        c[2] += a1 * b0;
        c[3] += a1 * b1;
      }
    }
    epi(g, n0 + 2 * t, c[0]);
    epi(g, n0 + 2 * t + 1, c[1]);
    epi(g + 8, n0 + 2 * t, c[2]);
    epi(g + 8, n0 + 2 * t + 1, c[3]);
  }
}

template <typename T> struct Args {
  using A = acc_t<T>;
  const T *x, *res, *dy, *wd, *bd, *wu, *bu, *lnw, *lnb;
  int M, d, r, act, mode, TM;
  A scaling, eps;
  T *y;                                 // forward output
  T *dx, *dres, *s_act, *s_dh, *s_dv, *s_u;  // backward outputs and r-wide / d-wide per-token scratch
  A *p_lnw, *p_lnb;                     // backward: per-CTA column partials of the LayerNorm gradients
};

// Shared memory of one CTA (accumulation type): two d-wide row buffers (three for LN_BEFORE, which keeps z),
// two r-wide ones and the row statistics. Rows are padded by one element against bank conflicts.
inline int n_dbuf(int mode) { return mode == LN_BEFORE ? 3 : 2; }
template <typename A> inline size_t smem_bytes(int TM, int d, int r, int mode) {
  return sizeof(A) * (size_t(TM) * (n_dbuf(mode) * (d + 1) + 2 * (r + 1)) + 4 * TM);
}

// Row statistics (mean, 1/sqrt(var + eps)) of rows [0, TM) of buf, one warp per row, two-pass variance.
template <typename A> __device__ void row_stats(const A* buf, int ld, int TMv, int d, A eps, A* mean, A* rstd) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < TMv; t += NWARP) {
    A s = 0;
    for (int c = lane; c < d; c += 32) s += buf[t * ld + c];
    const A mu = warp_sum(s) / A(d);
    A v = 0;
    for (int c = lane; c < d; c += 32) { const A z = buf[t * ld + c] - mu; v += z * z; }
    const A var = warp_sum(v) / A(d);
    if (lane == 0) { mean[t] = mu; rstd[t] = rsqrt_acc(var + eps); }
  }
}

// Recompute, for the CTA's tokens, the adapter input `ain` (x, or LN(x + res)), the base the adapter adds
// to (x, x + res, or x + res), the pre-activation `hpre` and activation `hact`. Ends with a barrier.
template <typename T>
__device__ void adapter_front(const Args<T>& a, int m0, int TMv, acc_t<T>* ain, acc_t<T>* base, acc_t<T>* zbuf,
                              acc_t<T>* hpre, acc_t<T>* hact, acc_t<T>* mz, acc_t<T>* rz, int ldd, int ldr) {
  using A = acc_t<T>;
  const int d = a.d, r = a.r;
  for (int e = threadIdx.x; e < TMv * d; e += NTHR) {  // coalesced: consecutive threads, consecutive columns
    const int t = e / d, c = e % d;
    const int64_t gi = int64_t(m0 + t) * d + c;
    const A xv = to_acc(a.x[gi]);
    A b = xv;
    if (a.mode != PLAIN) b += to_acc(a.res[gi]);
    if (a.mode == LN_BEFORE) b = to_acc(from_acc<T>(b));  // z = x + res in the input dtype, as torch's add
    ain[t * ldd + c] = xv;
    base[t * ldd + c] = b;
    if (a.mode == LN_BEFORE) zbuf[t * ldd + c] = b;
  }
  __syncthreads();
  if (a.mode == LN_BEFORE) {  // the adapter reads u = LN(z), z = x + res (AdapterHub's original_ln_before)
    row_stats<A>(zbuf, ldd, TMv, d, a.eps, mz, rz);
    __syncthreads();
    for (int e = threadIdx.x; e < TMv * d; e += NTHR) {
      const int t = e / d, c = e % d;
      ain[t * ldd + c] = (zbuf[t * ldd + c] - mz[t]) * rz[t] * to_acc(a.lnw[c]) + to_acc(a.lnb[c]);
    }
    __syncthreads();
  }
  // Down-projection h = ain . Wd^T + bd (tokens x r, K = d).
  warp_gemm16<T>(
      d, r, [&](int t, int k) -> A { return (t < TMv && k < d) ? ain[t * ldd + k] : A(0); },
      [&](int k, int j) -> A { return (k < d && j < r) ? to_acc(a.wd[int64_t(j) * d + k]) : A(0); },
      [&](int t, int j, A v) {
        if (t < TMv && j < r) {
          const A h = v + to_acc(a.bd[j]);
          if (hpre) hpre[t * ldr + j] = h;
          hact[t * ldr + j] = act_f<A>(h, a.act);
        }
      });
  __syncthreads();
}

// base[t][c] += s * (bu[c] + sum_j hact[t][j] Wu[c][j]). Ends with a barrier.
template <typename T>
__device__ void adapter_up(const Args<T>& a, int TMv, const acc_t<T>* hact, acc_t<T>* base, int ldd, int ldr) {
  using A = acc_t<T>;
  const int d = a.d, r = a.r;
  warp_gemm16<T>(
      r, d, [&](int t, int j) -> A { return (t < TMv && j < r) ? hact[t * ldr + j] : A(0); },
      [&](int j, int c) -> A { return (j < r && c < d) ? to_acc(a.wu[int64_t(c) * r + j]) : A(0); },
      [&](int t, int c, A v) {
        if (t < TMv && c < d) base[t * ldd + c] += a.scaling * (v + to_acc(a.bu[c]));
      });
  __syncthreads();
}

template <typename T> __global__ void __launch_bounds__(NTHR) adapter_fwd_kernel(Args<T> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int TM = a.TM, d = a.d, r = a.r, ldd = d + 1, ldr = r + 1;
  A* ain = reinterpret_cast<A*>(smem_raw);
  A* base = ain + TM * ldd;
  A* zbuf = base + TM * ldd;  // LN_BEFORE only
  A* hact = ain + (a.mode == LN_BEFORE ? 3 : 2) * TM * ldd;
  A* hpre = hact + TM * ldr;  // unused in forward (kept for one layout)
  A* st = hpre + TM * ldr;    // mean_v, rstd_v, mean_z, rstd_z
  const int m0 = blockIdx.x * TM, TMv = min(TM, a.M - m0);
  adapter_front<T>(a, m0, TMv, ain, base, zbuf, nullptr, hact, st + 2 * TM, st + 3 * TM, ldd, ldr);
  adapter_up<T>(a, TMv, hact, base, ldd, ldr);
  if (a.mode != PLAIN) { row_stats<A>(base, ldd, TMv, d, a.eps, st, st + TM); __syncthreads(); }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < TMv; t += NWARP) {  // one warp per row: coalesced stores
    for (int c = lane; c < d; c += 32) {
      A v = base[t * ldd + c];
      if (a.mode != PLAIN) v = (v - st[t]) * st[TM + t] * to_acc(a.lnw[c]) + to_acc(a.lnb[c]);
      a.y[int64_t(m0 + t) * d + c] = from_acc<T, A>(v);
    }
  }
}

// LayerNorm backward over rows [0, TMv): g (in gbuf) -> dv (written to out, which may alias gbuf's row only
// when the same lane reads before it writes). xs = the normalised input's source, (mean, rstd) its stats.
// Also adds the column partials sum_t g * xhat, sum_t g into p_lnw[c], p_lnb[c] (thread per column).
template <typename T>
__device__ void ln_backward(const Args<T>& a, int TMv, const acc_t<T>* gbuf, bool g_global, int m0,
                            const acc_t<T>* xs, const acc_t<T>* mean, const acc_t<T>* rstd, acc_t<T>* out,
                            bool accumulate_out, acc_t<T>* pw, acc_t<T>* pb, bool first, int ldd) {
  using A = acc_t<T>;
  const int d = a.d;
  auto gval = [&](int t, int c) -> A { return g_global ? to_acc(a.dy[int64_t(m0 + t) * d + c]) : gbuf[t * ldd + c]; };
  for (int c = threadIdx.x; c < d; c += NTHR) {  // fixed token order per column: deterministic
    A sw = 0, sb = 0;
    for (int t = 0; t < TMv; ++t) {
      const A gv = gval(t, c);
      sw += gv * (xs[t * ldd + c] - mean[t]) * rstd[t];
      sb += gv;
    }
    pw[c] = first ? sw : pw[c] + sw;
    pb[c] = first ? sb : pb[c] + sb;
  }
  __syncthreads();  // `out` may alias `xs`: every column read above happens before any row write below
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int t = warp; t < TMv; t += NWARP) {
    A s1 = 0, s2 = 0;
    for (int c = lane; c < d; c += 32) {
      const A gh = gval(t, c) * to_acc(a.lnw[c]);
      s1 += gh;
      s2 += gh * (xs[t * ldd + c] - mean[t]) * rstd[t];
    }
    const A m1 = warp_sum(s1) / A(d), m2 = warp_sum(s2) / A(d);
    for (int c = lane; c < d; c += 32) {
      const A xh = (xs[t * ldd + c] - mean[t]) * rstd[t];
      const A dv = rstd[t] * (gval(t, c) * to_acc(a.lnw[c]) - m1 - xh * m2);
      out[t * ldd + c] = accumulate_out ? out[t * ldd + c] + dv : dv;
    }
  }
  __syncthreads();
}

template <typename T> __global__ void __launch_bounds__(NTHR) adapter_bwd_kernel(Args<T> a) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int TM = a.TM, d = a.d, r = a.r, ldd = d + 1, ldr = r + 1;
  A* ain = reinterpret_cast<A*>(smem_raw);
  A* base = ain + TM * ldd;
  A* zbuf = base + TM * ldd;  // LN_BEFORE only
  A* hact = ain + (a.mode == LN_BEFORE ? 3 : 2) * TM * ldd;
  A* hpre = hact + TM * ldr;
  A* st = hpre + TM * ldr;
  const int m0 = blockIdx.x * TM, TMv = min(TM, a.M - m0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  A* pw = a.p_lnw ? a.p_lnw + int64_t(blockIdx.x) * d : nullptr;
  A* pb = a.p_lnb ? a.p_lnb + int64_t(blockIdx.x) * d : nullptr;

  adapter_front<T>(a, m0, TMv, ain, base, zbuf, hpre, hact, st + 2 * TM, st + 3 * TM, ldd, ldr);
  // Per-token tensors for the weight-gradient GEMMs (r-wide: 2r/d of the activation bytes).
  for (int e = threadIdx.x; e < TMv * r; e += NTHR) {
    const int t = e / r, j = e % r;
    a.s_act[int64_t(m0 + t) * r + j] = from_acc<T, A>(hact[t * ldr + j]);
  }
  if (a.mode == LN_BEFORE) {
    for (int e = threadIdx.x; e < TMv * d; e += NTHR) {
      const int t = e / d, c = e % d;
      a.s_u[int64_t(m0 + t) * d + c] = from_acc<T, A>(ain[t * ldd + c]);
    }
  }
  // dv: gradient at the adapter's output v = base + s f(ain).
  if (a.mode == PLAIN) {
    for (int e = threadIdx.x; e < TMv * d; e += NTHR) {
      const int t = e / d, c = e % d;
      base[t * ldd + c] = to_acc(a.dy[int64_t(m0 + t) * d + c]);
    }
    __syncthreads();
  } else {
    adapter_up<T>(a, TMv, hact, base, ldd, ldr);           // base = v
    row_stats<A>(base, ldd, TMv, d, a.eps, st, st + TM);   // stats of v
    __syncthreads();
    ln_backward<T>(a, TMv, nullptr, true, m0, base, st, st + TM, base, false, pw, pb, true, ldd);  // base = dv
    for (int t = warp; t < TMv; t += NWARP) {
      for (int c = lane; c < d; c += 32) {
        const T v = from_acc<T, A>(base[t * ldd + c]);
        if (a.mode == LN_AFTER) a.dres[int64_t(m0 + t) * d + c] = v;  // v = x + s f(x) + res: dres = dv
        else a.s_dv[int64_t(m0 + t) * d + c] = v;
      }
    }
  }
  // dh = s (dv . Wu) * act'(h) (tokens x r, K = d), in place of hpre: each element is read, then written,
  // by the one lane that owns it.
  warp_gemm16<T>(
      d, r, [&](int t, int c) -> A { return (t < TMv && c < d) ? base[t * ldd + c] : A(0); },
      [&](int c, int j) -> A { return (c < d && j < r) ? to_acc(a.wu[int64_t(c) * r + j]) : A(0); },
      [&](int t, int j, A v) {
        if (t < TMv && j < r) {
          const A dh = a.scaling * v * act_df<A>(hpre[t * ldr + j], a.act);
          hpre[t * ldr + j] = dh;
          a.s_dh[int64_t(m0 + t) * r + j] = from_acc<T, A>(dh);
        }
      });
  __syncthreads();
  // da_in = dh Wd: added to dv (dx = dv + da_in) or, for LN_BEFORE, kept for the first LayerNorm's backward.
  A* dain = (a.mode == LN_BEFORE) ? ain : base;
  const bool add = a.mode != LN_BEFORE;
  warp_gemm16<T>(
      r, d, [&](int t, int j) -> A { return (t < TMv && j < r) ? hpre[t * ldr + j] : A(0); },
      [&](int j, int c) -> A { return (j < r && c < d) ? to_acc(a.wd[int64_t(j) * d + c]) : A(0); },
      [&](int t, int c, A v) {
        if (t < TMv && c < d) dain[t * ldd + c] = add ? dain[t * ldd + c] + v : v;
      });
  __syncthreads();
  if (a.mode == LN_BEFORE)  // dz = dv + LN_backward(da_in) w.r.t. z: base += ...
    ln_backward<T>(a, TMv, ain, false, m0, zbuf, st + 2 * TM, st + 3 * TM, base, true, pw, pb, false, ldd);
  for (int t = warp; t < TMv; t += NWARP) {
    for (int c = lane; c < d; c += 32) {
      const T v = from_acc<T, A>(base[t * ldd + c]);
      a.dx[int64_t(m0 + t) * d + c] = v;
      if (a.mode == LN_BEFORE) a.dres[int64_t(m0 + t) * d + c] = v;  // z = x + res: dres = dx
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename T> struct DevType { using type = T; };
template <> struct DevType<at::Half> { using type = __half; };
template <> struct DevType<at::BFloat16> { using type = __nv_bfloat16; };

int act_code(const std::string& s) {
  if (s == "relu") return RELU;
  if (s == "gelu") return GELU;
  if (s == "silu" || s == "swish") return SILU;
  TORCH_CHECK(false, "effir_C.adapter: activation must be relu, gelu or silu, got '", s, "'");
}

struct Plan { int TM, tiles; size_t smem; };

template <typename A> Plan plan_for(int64_t M, int d, int r, int mode) {
  const size_t budget = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t one = smem_bytes<A>(1, d, r, mode);
  TORCH_CHECK(one <= budget, "effir_C.adapter: hidden size d=", d, " / bottleneck r=", r,
              " need more shared memory per token than this GPU has; use backend='triton' or 'recompute'");
  int TM = 1;
  while (TM < TM_MAX && smem_bytes<A>(TM + 1, d, r, mode) <= budget) ++TM;
  return Plan{TM, ceil_div(M, TM), smem_bytes<A>(TM, d, r, mode)};
}

template <typename T> T* dptr(const at::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }

void check_common(const at::Tensor& x, const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& wu,
                  const at::Tensor& bu) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "effir_C.adapter: x must be a 2-D CUDA tensor (M, d)");
  const int64_t d = x.size(1), r = wd.size(0);
  TORCH_CHECK(wd.dim() == 2 && wd.size(1) == d && bd.numel() == r && wu.dim() == 2 && wu.size(0) == d &&
                  wu.size(1) == r && bu.numel() == d,
              "effir_C.adapter: expected w_down (r, d), b_down (r,), w_up (d, r), b_up (d,)");
  for (const auto* t : {&wd, &bd, &wu, &bu})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "effir_C.adapter: parameters must share x's dtype and device");
  TORCH_CHECK(x.size(0) >= 1 && d >= 1 && r >= 1, "effir_C.adapter: empty input");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && d < (1 << 20), "effir_C.adapter: too many tokens or too wide");
}

// Launch forward (y defined) or backward (dy defined); mode as above.
at::Tensor run_fwd(const at::Tensor& x_, const at::Tensor& res_, const at::Tensor& wd_, const at::Tensor& bd_,
                   const at::Tensor& wu_, const at::Tensor& bu_, const at::Tensor& lnw_, const at::Tensor& lnb_,
                   int act, double scaling, double eps, int mode) {
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), wd = wd_.contiguous(), bd = bd_.contiguous(), wu = wu_.contiguous(),
             bu = bu_.contiguous();
  const auto res = res_.defined() ? res_.contiguous() : res_, lnw = lnw_.defined() ? lnw_.contiguous() : lnw_,
             lnb = lnb_.defined() ? lnb_.contiguous() : lnb_;
  auto y = at::empty_like(x);
  const int64_t M = x.size(0);
  const int d = static_cast<int>(x.size(1)), r = static_cast<int>(wd.size(0));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effir_adapter_fwd", [&] {
    using T = typename DevType<scalar_t>::type;
    using A = acc_t<T>;
    const Plan p = plan_for<A>(M, d, r, mode);
    Args<T> a{};
    a.x = dptr<const T>(x); a.res = dptr<const T>(res); a.wd = dptr<const T>(wd); a.bd = dptr<const T>(bd);
    a.wu = dptr<const T>(wu); a.bu = dptr<const T>(bu); a.lnw = dptr<const T>(lnw); a.lnb = dptr<const T>(lnb);
    a.M = static_cast<int>(M); a.d = d; a.r = r; a.act = act; a.mode = mode; a.TM = p.TM;
    a.scaling = static_cast<A>(scaling); a.eps = static_cast<A>(eps);
    a.y = dptr<T>(y);
    C10_CUDA_CHECK(cudaFuncSetAttribute(adapter_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(p.smem)));
    adapter_fwd_kernel<T><<<p.tiles, NTHR, p.smem, stream>>>(a);
    EFFIR_CHECK_LAUNCH();
  });
  return y;
}

// Returns dx, dres (undefined for PLAIN), dwd, dbd, dwu, dbu, dlnw, dlnb (the last two undefined for PLAIN).
std::vector<at::Tensor> run_bwd(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& res_,
                                const at::Tensor& wd_, const at::Tensor& bd_, const at::Tensor& wu_,
                                const at::Tensor& bu_, const at::Tensor& lnw_, const at::Tensor& lnb_, int act,
                                double scaling, double eps, int mode) {
  c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), dy = dy_.contiguous(), wd = wd_.contiguous(), bd = bd_.contiguous(),
             wu = wu_.contiguous(), bu = bu_.contiguous();
  const auto res = res_.defined() ? res_.contiguous() : res_, lnw = lnw_.defined() ? lnw_.contiguous() : lnw_,
             lnb = lnb_.defined() ? lnb_.contiguous() : lnb_;
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "effir_C.adapter: dy must match x");
  const int64_t M = x.size(0);
  const int d = static_cast<int>(x.size(1)), r = static_cast<int>(wd.size(0));
  const bool ln = mode != PLAIN;
  auto dx = at::empty_like(x);
  // A separate dres even when it equals dx: custom ops must not return aliased outputs.
  at::Tensor dres = ln ? at::empty_like(x) : at::Tensor();
  auto s_act = at::empty({M, r}, x.options()), s_dh = at::empty({M, r}, x.options());
  at::Tensor s_dv = mode == LN_BEFORE ? at::empty_like(x) : at::Tensor();
  at::Tensor s_u = mode == LN_BEFORE ? at::empty_like(x) : at::Tensor();
  at::Tensor p_lnw, p_lnb;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "effir_adapter_bwd", [&] {
    using T = typename DevType<scalar_t>::type;
    using A = acc_t<T>;
    const Plan p = plan_for<A>(M, d, r, mode);
    const auto acc_dtype = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
    if (ln) {
      p_lnw = at::empty({p.tiles, d}, x.options().dtype(acc_dtype));
      p_lnb = at::empty({p.tiles, d}, x.options().dtype(acc_dtype));
    }
    Args<T> a{};
    a.x = dptr<const T>(x); a.res = dptr<const T>(res); a.dy = dptr<const T>(dy);
    a.wd = dptr<const T>(wd); a.bd = dptr<const T>(bd); a.wu = dptr<const T>(wu); a.bu = dptr<const T>(bu);
    a.lnw = dptr<const T>(lnw); a.lnb = dptr<const T>(lnb);
    a.M = static_cast<int>(M); a.d = d; a.r = r; a.act = act; a.mode = mode; a.TM = p.TM;
    a.scaling = static_cast<A>(scaling); a.eps = static_cast<A>(eps);
    a.dx = dptr<T>(dx); a.dres = dptr<T>(dres); a.s_act = dptr<T>(s_act); a.s_dh = dptr<T>(s_dh);
    a.s_dv = dptr<T>(s_dv); a.s_u = dptr<T>(s_u); a.p_lnw = dptr<A>(p_lnw); a.p_lnb = dptr<A>(p_lnb);
    C10_CUDA_CHECK(cudaFuncSetAttribute(adapter_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(p.smem)));
    adapter_bwd_kernel<T><<<p.tiles, NTHR, p.smem, stream>>>(a);
    EFFIR_CHECK_LAUNCH();
  });
  // Token reductions: GEMMs over the per-token tensors (cuBLAS: fp32 accumulation, deterministic order).
  const at::Tensor& dv = mode == PLAIN ? dy : (mode == LN_AFTER ? dres : s_dv);
  const at::Tensor& ain = mode == LN_BEFORE ? s_u : x;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dwu = (at::mm(dv.t(), s_act).to(acc_dtype) * scaling).to(x.scalar_type());
  auto dbu = (dv.sum(0, false, acc_dtype) * scaling).to(x.scalar_type());
  auto dwd = at::mm(s_dh.t(), ain);
  auto dbd = s_dh.sum(0, false, acc_dtype).to(x.scalar_type());
  at::Tensor dlnw, dlnb;
  if (ln) {
    dlnw = p_lnw.sum(0).to(x.scalar_type());
    dlnb = p_lnb.sum(0).to(x.scalar_type());
  }
  return {dx, dres, dwd, dbd, dwu, dbu, dlnw, dlnb};
}

at::Tensor adapter_fwd(const at::Tensor& x, const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& wu,
                       const at::Tensor& bu, c10::string_view activation, double scaling) {
  check_common(x, wd, bd, wu, bu);
  return run_fwd(x, at::Tensor(), wd, bd, wu, bu, at::Tensor(), at::Tensor(), act_code(std::string(activation)),
                 scaling, 0.0, PLAIN);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& wu,
    const at::Tensor& bu, c10::string_view activation, double scaling) {
  check_common(x, wd, bd, wu, bu);
  auto g = run_bwd(dy, x, at::Tensor(), wd, bd, wu, bu, at::Tensor(), at::Tensor(),
                   act_code(std::string(activation)), scaling, 0.0, PLAIN);
  return {g[0], g[2], g[3], g[4], g[5]};
}

void check_ln(const at::Tensor& x, const at::Tensor& res, const at::Tensor& lnw, const at::Tensor& lnb) {
  TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type() && res.device() == x.device(),
              "effir_C.adapter_ln: res must match x");
  TORCH_CHECK(lnw.numel() == x.size(1) && lnb.numel() == x.size(1) && lnw.scalar_type() == x.scalar_type() &&
                  lnb.scalar_type() == x.scalar_type(),
              "effir_C.adapter_ln: ln_weight / ln_bias must be (d,) in x's dtype");
}

at::Tensor adapter_ln_fwd(const at::Tensor& x, const at::Tensor& res, const at::Tensor& wd, const at::Tensor& bd,
                          const at::Tensor& wu, const at::Tensor& bu, const at::Tensor& lnw, const at::Tensor& lnb,
                          c10::string_view activation, double scaling, double eps, bool original_ln_before) {
  check_common(x, wd, bd, wu, bu);
  check_ln(x, res, lnw, lnb);
  return run_fwd(x, res, wd, bd, wu, bu, lnw, lnb, act_code(std::string(activation)), scaling, eps,
                 original_ln_before ? LN_BEFORE : LN_AFTER);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adapter_ln_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& res, const at::Tensor& wd,
               const at::Tensor& bd, const at::Tensor& wu, const at::Tensor& bu, const at::Tensor& lnw,
               const at::Tensor& lnb, c10::string_view activation, double scaling, double eps,
               bool original_ln_before) {
  check_common(x, wd, bd, wu, bu);
  check_ln(x, res, lnw, lnb);
  auto g = run_bwd(dy, x, res, wd, bd, wu, bu, lnw, lnb, act_code(std::string(activation)), scaling, eps,
                   original_ln_before ? LN_BEFORE : LN_AFTER);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(effir_C, CUDA, m) {
  m.impl("adapter_fwd", &adapter_fwd);
  m.impl("adapter_bwd", &adapter_bwd);
  m.impl("adapter_ln_fwd", &adapter_ln_fwd);
  m.impl("adapter_ln_bwd", &adapter_ln_bwd);
}

}  // namespace effir
