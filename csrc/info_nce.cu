// Fused in-batch contrastive loss (InfoNCE) for effir: forward (per-row log-sum-exp, loss and d loss/d t)
// and backward (recompute; dq over row blocks, ddocs over column blocks, FlashAttention-2 shape, no atomics).
// The score matrix S = q docs^T never exists in global memory: each CTA holds a 64 x 64 tile in registers.
// Math and signatures: /work/notes contract == effir/ops/info_nce_chunked.py (the pure-torch twin).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common.cuh"

namespace effir {
namespace {

constexpr int BM = 64;     // rows per CTA: 4 warps x 16 rows, each warp owns whole rows of the score tile
constexpr int BN = 64;     // columns per score tile
constexpr int BK = 32;     // chunk of d staged in shared memory for S = X Y^T
constexpr int DK = 64;     // chunk of d staged for the gradient product dX += dS Y
constexpr int NWARP = 4;
constexpr int NTHR = 32 * NWARP;
constexpr int NT = BN / 8; // n8 tiles per warp row strip

template <typename T> struct Lay {
  // 16-bit rows padded by 16 bytes: 32-bit fragment loads of a warp hit 32 distinct banks. fp32 rows padded
  // by one word: the column-broadcast pattern of the FFMA path is conflict-free.
  static constexpr int PAD = is_16bit_v<T> ? 8 : 1;
  static constexpr int LDK = BK + PAD;
  static constexpr int LDD = DK + PAD;
  static constexpr int SCORE = (BM + BN) * LDK * (int)sizeof(T);
  static constexpr int YD = BN * LDD * (int)sizeof(T);
  static constexpr int DSS = is_16bit_v<T> ? 0 : NWARP * 16 * (BN + 1) * 4;  // fp32 path: dS through smem
  static constexpr int BYTES = (SCORE > YD ? SCORE : YD) + DSS;
};

struct Problem {
  int B, N, d, pos_offset;
  const float* temperature;  // 0-dim device tensor: read on the device, never synchronised to the host
  const int64_t* qg;         // (B,) or null
  const int64_t* dg;         // (N,) or null
};

// dst[r][c] = src[r0 + r][c0 + c] (row stride ld), zero outside [0, nrows) x [0, ncols). Zero fill matters:
// stale shared memory can hold NaN bit patterns, and 0 * NaN would poison the accumulators.
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int nrows, int ncols,
                                          int ld, int r0, int c0, bool vec) {
  constexpr int VE = 16 / (int)sizeof(T);
  if (vec) {  // ncols % VE == 0 and 16-byte aligned rows (checked on the host): 16-byte loads
    constexpr int VPR = COLS / VE;
    for (int e = threadIdx.x; e < ROWS * VPR; e += NTHR) {
      const int r = e / VPR, c = (e % VPR) * VE;
      const int gr = r0 + r, gc = c0 + c;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (gr < nrows && gc < ncols) raw = __ldg(reinterpret_cast<const uint4*>(src + (int64_t)gr * ld + gc));
      if constexpr (is_16bit_v<T>) {
        *reinterpret_cast<uint4*>(dst + r * LD + c) = raw;  // LD * 2 bytes is a multiple of 16
      } else {
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < VE; ++i) dst[r * LD + c + i] = v[i];
      }
    }
  } else {
    const T zero = from_acc<T>(acc_t<T>(0));
    for (int e = threadIdx.x; e < ROWS * COLS; e += NTHR) {
      const int r = e / COLS, c = e % COLS;
      const int gr = r0 + r, gc = c0 + c;
      dst[r * LD + c] = (gr < nrows && gc < ncols) ? src[(int64_t)gr * ld + gc] : zero;
    }
  }
}

// s[nt][.] += X[warp's 16 rows, chunk] . Y[64 cols, chunk]^T for one BK chunk staged in shared memory.
// Element (nt, e) of a thread is row (16 warp + g + 8 (e >> 1)), column (8 nt + 2 t + (e & 1)).
template <typename T>
__device__ __forceinline__ void score_chunk(float (&s)[NT][4], const T* Xs, const T* Ys, int warp, int g, int t) {
  constexpr int LDK = Lay<T>::LDK;
  if constexpr (is_16bit_v<T>) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      const T* xa = Xs + (warp * 16 + g) * LDK + kk + 2 * t;
      uint32_t a[4];
      a[0] = *reinterpret_cast<const uint32_t*>(xa);
      a[1] = *reinterpret_cast<const uint32_t*>(xa + 8 * LDK);
      a[2] = *reinterpret_cast<const uint32_t*>(xa + 8);
      a[3] = *reinterpret_cast<const uint32_t*>(xa + 8 * LDK + 8);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* yb = Ys + (nt * 8 + g) * LDK + kk + 2 * t;
        mma16816<T>(s[nt], a, *reinterpret_cast<const uint32_t*>(yb), *reinterpret_cast<const uint32_t*>(yb + 8));
      }
    }
  } else {  // fp32: exact FFMA (no TF32), same register layout as the mma path
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      const float xa = Xs[(warp * 16 + g) * LDK + k], xb = Xs[(warp * 16 + g + 8) * LDK + k];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float y0 = Ys[(nt * 8 + 2 * t) * LDK + k], y1 = Ys[(nt * 8 + 2 * t + 1) * LDK + k];
        s[nt][0] = fmaf(xa, y0, s[nt][0]);
        s[nt][1] = fmaf(xa, y1, s[nt][1]);
        s[nt][2] = fmaf(xb, y0, s[nt][2]);
        s[nt][3] = fmaf(xb, y1, s[nt][3]);
      }
    }
  }
}

// The raw score tile S[r0:r0+64, c0:c0+64] (fp32) in registers; ends with a barrier, so the shared buffers
// are free for the caller afterwards.
template <typename T>
__device__ __forceinline__ void score_tile(float (&s)[NT][4], const T* X, int nx, const T* Y, int ny, int d,
                                           int r0, int c0, bool vec, T* Xs, T* Ys, int warp, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  for (int k0 = 0; k0 < d; k0 += BK) {
    load_tile<T, BM, BK, Lay<T>::LDK>(Xs, X, nx, d, d, r0, k0, vec);
    load_tile<T, BN, BK, Lay<T>::LDK>(Ys, Y, ny, d, d, c0, k0, vec);
    __syncthreads();
    score_chunk<T>(s, Xs, Ys, warp, g, t);
    __syncthreads();
  }
}

// Direction 0 (ROWS_Q): rows = the B queries, columns = the N docs.
// Direction 1 (!ROWS_Q): rows = the B positives docs[0:B], columns = the B queries (symmetric loss).
// Query index i and doc index j of an element, whichever is the row.
template <bool ROWS_Q> __device__ __forceinline__ void qd_index(int row, int col, int& i, int& j) {
  if constexpr (ROWS_Q) { i = row; j = col; } else { i = col; j = row; }
}

template <typename T, bool ROWS_Q>
__global__ void __launch_bounds__(NTHR) lse_kernel(const T* __restrict__ q, const T* __restrict__ docs, Problem P,
                                                   bool vec, float* __restrict__ loss, float* __restrict__ lse,
                                                   float* __restrict__ dldt) {
  __shared__ __align__(16) unsigned char smem[Lay<T>::SCORE];
  T* Xs = reinterpret_cast<T*>(smem);
  T* Ys = Xs + BM * Lay<T>::LDK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* X = ROWS_Q ? q : docs;
  const T* Y = ROWS_Q ? docs : q;
  const int nrows = P.B, ncols = ROWS_Q ? P.N : P.B;
  const int r0 = blockIdx.x * BM;
  const float inv_t = 1.f / __ldg(P.temperature);
  const bool groups = P.qg != nullptr;

  int row[2];
  int64_t rgrp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + warp * 16 + g + 8 * h;
    rgrp[h] = (groups && row[h] < nrows) ? (ROWS_Q ? P.qg[row[h]] : P.dg[row[h]]) : 0;
  }
  // Per thread and row: running max m, sum l = sum exp(x - m), w = sum exp(x - m) * x, the positive's logit.
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, w[2] = {0.f, 0.f}, xpos[2] = {0.f, 0.f};

  for (int c0 = 0; c0 < ncols; c0 += BN) {
    float s[NT][4];
    score_tile<T>(s, X, nrows, Y, ncols, P.d, r0, c0, vec, Xs, Ys, warp, g, t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tmax = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = c0 + nt * 8 + 2 * t + e;
          int i, j;
          qd_index<ROWS_Q>(row[h], col, i, j);
          const bool pos = (j == i + P.pos_offset);
          bool valid = row[h] < nrows && col < ncols;
          if (valid && groups && !pos) valid = (ROWS_Q ? P.dg[col] : P.qg[col]) != rgrp[h];
          const float x = s[nt][2 * h + e] * inv_t;
          if (valid && pos) xpos[h] = x;
          s[nt][2 * h + e] = valid ? x : -INFINITY;
          tmax = fmaxf(tmax, s[nt][2 * h + e]);
        }
      }
      const float mn = fmaxf(m[h], tmax);
      if (mn != -INFINITY) {  // else nothing valid yet: keep the empty state (avoids exp(-inf + inf))
        const float c = expf(m[h] - mn);
        l[h] *= c;
        w[h] *= c;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = s[nt][2 * h + e];
            const float p = expf(x - mn);  // exp(-inf) = 0 for masked columns
            l[h] += p;
            w[h] += (x == -INFINITY) ? 0.f : p * x;
          }
        }
        m[h] = mn;
      }
    }
  }
  // Merge the 4 lanes of a quad (they hold the same rows): fixed xor order, deterministic.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mq = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
    mq = fmaxf(mq, __shfl_xor_sync(0xffffffffu, mq, 2));
    const float sc = (m[h] == -INFINITY) ? 0.f : expf(m[h] - mq);
    const float lq = quad_sum(l[h] * sc), wq = quad_sum(w[h] * sc), xq = quad_sum(xpos[h]);
    if (t == 0 && row[h] < nrows) {
      const float L = mq + logf(lq);
      lse[row[h]] = L;
      loss[row[h]] = L - xq;
      dldt[row[h]] = (xq - wq / lq) * inv_t;  // (x_pos - sum_j P_j x_j) / t = (S_pos - sum P S) / t^2
    }
  }
}

// dX[rows] = (1/t) sum_cols dS * Y[cols], with
// dS_ij = g0[i] P_ij + [j < B] g1[j] Pc_ij - [j == i + o] (g0[i] + g1[i]), masked entries 0 (contract).
// ROWS_Q: X = q, Y = docs, out = dq.  !ROWS_Q: X = docs (all N rows), Y = q, out = ddocs.
// blockIdx.y picks a DCH-wide slice of d for the accumulators (registers: 16 x DCH per warp).
template <typename T, bool ROWS_Q, int DCH>
__global__ void __launch_bounds__(NTHR) grad_kernel(const T* __restrict__ q, const T* __restrict__ docs, Problem P,
                                                    bool vec, const float* __restrict__ lse,
                                                    const float* __restrict__ gl, const float* __restrict__ gmax,
                                                    bool sym, T* __restrict__ out) {
  __shared__ __align__(16) unsigned char smem[Lay<T>::BYTES];
  constexpr int LDD = Lay<T>::LDD;
  T* Xs = reinterpret_cast<T*>(smem);
  T* Ys = Xs + BM * Lay<T>::LDK;
  T* Yd = reinterpret_cast<T*>(smem);  // aliases Xs/Ys: used only between the barriers of the dX phase
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* X = ROWS_Q ? q : docs;
  const T* Y = ROWS_Q ? docs : q;
  const int B = P.B, d = P.d;
  const int nrows = ROWS_Q ? B : P.N, ncols = ROWS_Q ? P.N : B;
  const int r0 = blockIdx.x * BM, dc0 = blockIdx.y * DCH;
  const float inv_t = 1.f / __ldg(P.temperature);
  const bool groups = P.qg != nullptr;
  // 16-bit dS is scaled by 1 / max|grad_loss| before rounding: with a mean reduction grad_loss ~ 1/B, which
  // fp16 would flush towards its subnormals. Undone in fp32 at the store. fp32 needs no scaling.
  const float gm = is_16bit_v<T> ? __ldg(gmax) : 1.f;
  const float ds_scale = gm > 0.f ? 1.f / gm : 1.f, out_scale = inv_t * (gm > 0.f ? gm : 1.f);

  int row[2];
  int64_t rgrp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + warp * 16 + g + 8 * h;
    rgrp[h] = (groups && row[h] < nrows) ? (ROWS_Q ? P.qg[row[h]] : P.dg[row[h]]) : 0;
  }
  float acc[DCH / 8][4];
#pragma unroll
  for (int n = 0; n < DCH / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int c0 = 0; c0 < ncols; c0 += BN) {
    float s[NT][4];
    score_tile<T>(s, X, nrows, Y, ncols, d, r0, c0, vec, Xs, Ys, warp, g, t);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, col = c0 + nt * 8 + 2 * t + (e & 1);
        float v = 0.f;
        if (row[h] < nrows && col < ncols) {
          int i, j;
          qd_index<ROWS_Q>(row[h], col, i, j);
          const bool pos = (j == i + P.pos_offset);
          const bool masked = groups && !pos && (ROWS_Q ? P.dg[col] : P.qg[col]) == rgrp[h];
          const float x = s[nt][e] * inv_t;
          if (!masked) {
            v = __ldg(gl + i) * expf(x - __ldg(lse + i));
            if (sym && j < B) v += __ldg(gl + B + j) * expf(x - __ldg(lse + B + j));
          }
          if (pos) v -= __ldg(gl + i) + (sym ? __ldg(gl + B + i) : 0.f);
        }
        s[nt][e] = v * ds_scale;
      }
    }

    if constexpr (is_16bit_v<T>) {
      // FlashAttention-2 register reuse: the C fragments of two adjacent n8 tiles are the A fragment of
      // one k16 step, so dS goes straight from the epilogue into the tensor cores.
      uint32_t af[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        af[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        af[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        af[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        af[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
#pragma unroll
      for (int ch = 0; ch < DCH / DK; ++ch) {
        const int dd0 = dc0 + ch * DK;
        if (dd0 < d) {
          load_tile<T, BN, DK, LDD>(Yd, Y, ncols, d, d, c0, dd0, vec);
          __syncthreads();
          const uint16_t* Yr = reinterpret_cast<const uint16_t*>(Yd);
#pragma unroll
          for (int n2 = 0; n2 < DK / 8; ++n2) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
              // B fragment (k = column 16kk + 2t.., n = dim 8 n2 + g): two rows apart in shared memory.
              const uint16_t* yb = Yr + (kk * 16 + 2 * t) * LDD + n2 * 8 + g;
              const uint32_t b0 = pack_raw(yb[0], yb[LDD]);
              const uint32_t b1 = pack_raw(yb[8 * LDD], yb[9 * LDD]);
              mma16816<T>(acc[ch * (DK / 8) + n2], af[kk], b0, b1);
            }
          }
          __syncthreads();
        }
      }
    } else {
      float* dSs = reinterpret_cast<float*>(smem + (Lay<T>::SCORE > Lay<T>::YD ? Lay<T>::SCORE : Lay<T>::YD)) +
                   warp * 16 * (BN + 1);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dSs[(g + 8 * (e >> 1)) * (BN + 1) + nt * 8 + 2 * t + (e & 1)] = s[nt][e];
      __syncwarp();
#pragma unroll
      for (int ch = 0; ch < DCH / DK; ++ch) {
        const int dd0 = dc0 + ch * DK;
        if (dd0 < d) {
          load_tile<T, BN, DK, LDD>(Yd, Y, ncols, d, d, c0, dd0, vec);
          __syncthreads();
          for (int jj = 0; jj < BN; ++jj) {
            const float d0 = dSs[g * (BN + 1) + jj], d1 = dSs[(g + 8) * (BN + 1) + jj];
#pragma unroll
            for (int n2 = 0; n2 < DK / 8; ++n2) {
              const float y0 = Yd[jj * LDD + n2 * 8 + 2 * t], y1 = Yd[jj * LDD + n2 * 8 + 2 * t + 1];
              float* a = acc[ch * (DK / 8) + n2];
              a[0] = fmaf(d0, y0, a[0]);
              a[1] = fmaf(d0, y1, a[1]);
              a[2] = fmaf(d1, y0, a[2]);
              a[3] = fmaf(d1, y1, a[3]);
            }
          }
          __syncthreads();
        }
      }
    }
  }
#pragma unroll
  for (int n = 0; n < DCH / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rr = row[e >> 1], dim = dc0 + n * 8 + 2 * t + (e & 1);
      if (rr < nrows && dim < d) out[(int64_t)rr * d + dim] = from_acc<T, float>(acc[n][e] * out_scale);
    }
  }
}

// ---------------------------------------------------------------- host side

// fp32 / fp16 / bf16 only (float64 is the 'chunked' backend's): f is called with a value of the device type.
template <typename F> void dispatch_16_32(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "effir_C.info_nce: dtype must be float32, float16 or bfloat16, got ", st);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& docs, const at::Tensor& temperature,
                  const std::optional<at::Tensor>& qg, const std::optional<at::Tensor>& dg) {
  TORCH_CHECK(q.is_cuda() && docs.is_cuda(), "effir_C.info_nce: q and docs must be CUDA tensors");
  TORCH_CHECK(q.dim() == 2 && docs.dim() == 2 && q.size(1) == docs.size(1),
              "effir_C.info_nce: q (B, d) and docs (N, d) expected, got ", q.sizes(), " and ", docs.sizes());
  TORCH_CHECK(q.scalar_type() == docs.scalar_type(), "effir_C.info_nce: q and docs must share a dtype");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "effir_C.info_nce: dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(q.size(0) >= 1 && docs.size(0) >= q.size(0) && q.size(1) >= 1,
              "effir_C.info_nce: need 1 <= B <= N and d >= 1");
  TORCH_CHECK(docs.size(0) < (int64_t(1) << 31) && q.size(1) < (int64_t(1) << 31), "effir_C.info_nce: too large");
  TORCH_CHECK(temperature.numel() == 1 && temperature.device() == q.device(),
              "effir_C.info_nce: temperature must be a one-element tensor on the inputs' device");
  TORCH_CHECK(qg.has_value() == dg.has_value(), "effir_C.info_nce: query_groups and doc_groups: both or neither");
  if (qg.has_value()) {
    TORCH_CHECK(qg->scalar_type() == at::kLong && dg->scalar_type() == at::kLong && qg->device() == q.device() &&
                    dg->device() == q.device() && qg->numel() == q.size(0) && dg->numel() == docs.size(0),
                "effir_C.info_nce: groups must be int64 (B,) / (N,) on the inputs' device");
  }
}

bool vec_ok(const at::Tensor& a, const at::Tensor& b) {
  const int64_t ve = 16 / a.element_size();
  return a.size(1) % ve == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0;
}

Problem make_problem(const at::Tensor& q, const at::Tensor& docs, const at::Tensor& temp,
                     const std::optional<at::Tensor>& qg, const std::optional<at::Tensor>& dg, int64_t pos_offset) {
  Problem P;
  P.B = static_cast<int>(q.size(0));
  P.N = static_cast<int>(docs.size(0));
  P.d = static_cast<int>(q.size(1));
  P.pos_offset = static_cast<int>(pos_offset);
  P.temperature = temp.data_ptr<float>();
  P.qg = qg.has_value() ? qg->data_ptr<int64_t>() : nullptr;
  P.dg = dg.has_value() ? dg->data_ptr<int64_t>() : nullptr;
  return P;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd(const at::Tensor& q_, const at::Tensor& docs_,
                                                             const at::Tensor& temperature,
                                                             const std::optional<at::Tensor>& qg_,
                                                             const std::optional<at::Tensor>& dg_,
                                                             int64_t pos_offset, bool symmetric) {
  check_inputs(q_, docs_, temperature, qg_, dg_);
  c10::cuda::CUDAGuard guard(q_.device());
  const auto q = q_.contiguous(), docs = docs_.contiguous();
  const auto temp = temperature.to(at::kFloat).reshape({}).contiguous();
  std::optional<at::Tensor> qg, dg;
  if (qg_.has_value()) { qg = qg_->contiguous(); dg = dg_->contiguous(); }
  TORCH_CHECK(pos_offset >= 0 && pos_offset + q.size(0) <= docs.size(0), "effir_C.info_nce: bad pos_offset");
  TORCH_CHECK(!symmetric || pos_offset == 0, "effir_C.info_nce: symmetric needs pos_offset == 0");
  const Problem P = make_problem(q, docs, temp, qg, dg, pos_offset);
  const int R = symmetric ? 2 : 1;
  auto opts = q.options().dtype(at::kFloat);
  auto loss = at::empty({R, P.B}, opts), lse = at::empty({R, P.B}, opts), dldt = at::empty({R, P.B}, opts);
  const bool vec = vec_ok(q, docs);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(ceil_div(P.B, BM));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const T* qp = reinterpret_cast<const T*>(q.data_ptr());
    const T* dp = reinterpret_cast<const T*>(docs.data_ptr());
    lse_kernel<T, true><<<grid, NTHR, 0, stream>>>(qp, dp, P, vec, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                                   dldt.data_ptr<float>());
    EFFIR_CHECK_LAUNCH();
    if (symmetric) {
      lse_kernel<T, false><<<grid, NTHR, 0, stream>>>(qp, dp, P, vec, loss.data_ptr<float>() + P.B,
                                                      lse.data_ptr<float>() + P.B, dldt.data_ptr<float>() + P.B);
      EFFIR_CHECK_LAUNCH();
    }
  };
  dispatch_16_32(q.scalar_type(), launch);
  return {loss, lse, dldt};
}

template <typename T, int DCH>
void launch_grad(const T* qp, const T* dp, const Problem& P, bool vec, const float* lse, const float* gl,
                 const float* gmax, bool sym, T* dq, T* ddocs, cudaStream_t stream) {
  const int ny = ceil_div(P.d, DCH);
  grad_kernel<T, true, DCH><<<dim3(ceil_div(P.B, BM), ny), NTHR, 0, stream>>>(qp, dp, P, vec, lse, gl, gmax, sym, dq);
  EFFIR_CHECK_LAUNCH();
  grad_kernel<T, false, DCH><<<dim3(ceil_div(P.N, BM), ny), NTHR, 0, stream>>>(qp, dp, P, vec, lse, gl, gmax, sym, ddocs);
  EFFIR_CHECK_LAUNCH();
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd(const at::Tensor& q_, const at::Tensor& docs_,
                                                const at::Tensor& temperature, const at::Tensor& lse_,
                                                const at::Tensor& grad_loss_, const std::optional<at::Tensor>& qg_,
                                                const std::optional<at::Tensor>& dg_, int64_t pos_offset) {
  check_inputs(q_, docs_, temperature, qg_, dg_);
  c10::cuda::CUDAGuard guard(q_.device());
  const auto q = q_.contiguous(), docs = docs_.contiguous();
  const auto temp = temperature.to(at::kFloat).reshape({}).contiguous();
  std::optional<at::Tensor> qg, dg;
  if (qg_.has_value()) { qg = qg_->contiguous(); dg = dg_->contiguous(); }
  const Problem P = make_problem(q, docs, temp, qg, dg, pos_offset);
  TORCH_CHECK(lse_.dim() == 2 && (lse_.size(0) == 1 || lse_.size(0) == 2) && lse_.size(1) == P.B &&
                  grad_loss_.sizes() == lse_.sizes(),
              "effir_C.info_nce_bwd: lse and grad_loss must be (R, B), R in {1, 2}");
  const bool sym = lse_.size(0) == 2;
  TORCH_CHECK(!sym || pos_offset == 0, "effir_C.info_nce: symmetric needs pos_offset == 0");
  const auto lse = lse_.to(at::kFloat).contiguous(), gl = grad_loss_.to(at::kFloat).contiguous();
  auto dq = at::empty_like(q), ddocs = at::empty_like(docs);
  const auto gmax = gl.abs().amax();  // stays on the device: read by the kernels, no host sync
  const bool vec = vec_ok(q, docs);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const T* qp = reinterpret_cast<const T*>(q.data_ptr());
    const T* dp = reinterpret_cast<const T*>(docs.data_ptr());
    T* dqp = reinterpret_cast<T*>(dq.data_ptr());
    T* ddp = reinterpret_cast<T*>(ddocs.data_ptr());
    const float* lp = lse.data_ptr<float>();
    const float* gp = gl.data_ptr<float>();
    const float* gm = gmax.data_ptr<float>();
    // Accumulator width: the whole of d when it fits in registers (one score recompute per row block),
    // else 256-wide slices of d over blockIdx.y (each slice recomputes the scores).
    if (P.d <= 64) launch_grad<T, 64>(qp, dp, P, vec, lp, gp, gm, sym, dqp, ddp, stream);
    else if (P.d <= 128) launch_grad<T, 128>(qp, dp, P, vec, lp, gp, gm, sym, dqp, ddp, stream);
    else launch_grad<T, 256>(qp, dp, P, vec, lp, gp, gm, sym, dqp, ddp, stream);
  };
  dispatch_16_32(q.scalar_type(), launch);
  return {dq, ddocs};
}

}  // namespace

TORCH_LIBRARY_IMPL(effir_C, CUDA, m) {
  m.impl("info_nce_fwd", &info_nce_fwd);
  m.impl("info_nce_bwd", &info_nce_bwd);
}

}  // namespace effir
