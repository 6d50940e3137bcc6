"""Triton kernels of the fused InfoNCE loss (FlashAttention-style, no (B, N) buffer in global memory).

- `_fwd_kernel` (grid: row blocks of q): tiles S = q . docs^T over column blocks, online log-sum-exp in the
  log2 domain, plus the running softmax-weighted score so d loss / d t comes for free.
- Backward, "blocked": the (B, N) score matrix is cut into blocks of at most (B + N) d
  entries. Per block, `_bwd_dscores_kernel` recomputes S from the saved per-row log-sum-exp and writes the
  block's dL/dS (input dtype) once; two GEMMs `_mm_acc_kernel` then add dS . docs into dq and dSᵀ . q into
  ddocs, in fp32. Every FLOP runs in a GEMM-shaped tile loop (8 B N d in all with the forward) and the only
  extra memory is one dS block plus the fp32 gradients.
- A fused backward (EFFIR_TRITON_LOSS_BWD=fused: dq over row blocks and ddocs over column blocks, each
  recomputing its S tiles and read-modify-writing its fp32 gradient rows in BLOCK_K slices, 10 B N d) was
  measured slower on the H100 (run 3, bench/results/gpu_h100_2026-11-27_run3, B = N = 32768, d = 768, bf16:
  89.6 ms against 15.8 ms for the blocked one) and removed.
fp32 inputs use `input_precision="ieee"` (no TF32); fp16/bf16 go through the tensor cores with fp32 accumulation.
Offsets are int32: q and docs must each hold fewer than 2**31 elements (checked by the launcher).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# constexpr: compiled for a GPU, a @triton.jit function may read only constexpr globals (the CPU interpreter
# does not check this; bench/triton_aot.py does)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# fp32 tiles take twice the shared memory of bf16 ones: a smaller tile keeps every kernel (the backward ones
# hold a score tile plus two operand pipelines) inside the 228 KB of an H100 SM. fp32 is the exact path, not the
# fast one.
_FP32 = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)


# 16-bit tiles per kernel group, (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_K = 64, best first. Every one
# compiles on sm_90 without register spills and, for the GEMM-shaped kernels, without ptxas's C7513/C7515
# (wgmma serialised) -- checked by bench/triton_aot.py: 128 x 256 spills everywhere; 128 x 128 on 8 warps
# serialises wgmma in the GEMM but not in the dS kernel; 256 x 64 on 8 warps (two 128 x 64 warpgroup tiles)
# does neither.
_SHAPES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3)],
    "dscores": [(256, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 4), (128, 64, 4, 4)],
    "gemm": [(256, 64, 8, 3), (256, 64, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4)],
}


def _configs(kind: str):
    """Autotune space of one kernel group (16-bit inputs; fp32 always runs `_FP32`). EFFIR_TRITON_AUTOTUNE:
    "small" (default, the first 2: a fresh GPU machine compiles every config of every constexpr variant, so
    this keeps first calls to seconds), "full" (all 4), "0" (the first, no tuning)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # CPU interpreter: one tiny config, no autotuning
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    mode = os.environ.get("EFFIR_TRITON_AUTOTUNE", "small")
    shapes = _SHAPES[kind]
    shapes = shapes[:1] if mode == "0" else shapes[:2] if mode == "small" else shapes
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes] + [_FP32]


def _pruner(work, small: int):
    """early_config_prune: fp32 -> the fp32 tile only; 16-bit -> the 16-bit tiles, only the first when
    work(args) < small (too short for the choice to matter, and tuning would cost more than it saves)."""
    def prune(configs, named_args, **kwargs):
        if kwargs.get("IEEE"):
            return [_FP32]
        half = [c for c in configs if c is not _FP32]
        return half[:1] if work(named_args) < small else half

    return {"early_config_prune": prune}


_PRUNE = _pruner(lambda a: a["B"] * a["N"], 1 << 22)  # score-matrix kernels: B x N scores
_PRUNE_MM = _pruner(lambda a: a["M"] * a["N"] * a["K"], 1 << 30)  # GEMM: M x N x K multiply-adds


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. IEEE: fp32 inputs, no TF32. UPCAST: Triton 3.6's CPU interpreter multiplies
    bf16 tiles wrongly, so under TRITON_INTERPRET=1 bf16 tiles are widened first (never on a GPU)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _scores(A, Bm, rows, cols, row_ok, col_ok, K, stride_a, stride_b, IEEE: tl.constexpr, UPCAST: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A[rows] . Bm[cols]^T, reduced over K in BLOCK_K slices."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(A + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(Bm + cols[None, :] * stride_b + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
    return acc


@triton.jit
def _keep(rows, cols, row_ok, col_ok, QG, DG, pos_offset, HAS_GROUPS: tl.constexpr):
    """(is_positive, kept) masks of a tile: kept = in range and not a same-group non-positive column."""
    is_pos = cols[None, :] == (rows + pos_offset)[:, None]
    keep = row_ok[:, None] & col_ok[None, :]
    if HAS_GROUPS:
        qg = tl.load(QG + rows, mask=row_ok, other=0)
        dg = tl.load(DG + cols, mask=col_ok, other=0)
        keep = keep & ((qg[:, None] != dg[None, :]) | is_pos)
    return is_pos, keep


@triton.autotune(configs=_configs("fwd"), key=["K", "IEEE", "HAS_GROUPS"], prune_configs_by=_PRUNE)
@triton.jit
def _fwd_kernel(Q, D, T, QG, DG, LOSS, LSE, DLDT, B, N, K, pos_offset, stride_q, stride_d,
                HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    t = tl.load(T).to(tl.float32)
    inv_t = 1.0 / t
    # Logits x = s / t stay in natural units and the max is subtracted before the LOG2E scaling: the positive's
    # logit (diag) is then the very value that entered the max, so a row whose positive dominates gets
    # loss = (m - diag) + ln(l) with m - diag exact, and a one-candidate row gets exactly 0 (as torch does).
    # Folding LOG2E into the logits (x * LOG2E - m2, one FMA) leaves a rounding residual there instead.
    # finite floor for the running max: a fully masked tile gives exp2(-inf) = 0, never inf - inf = nan
    m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        s = _scores(Q, D, rows, cols, row_ok, col_ok, K, stride_q, stride_d, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        is_pos, keep = _keep(rows, cols, row_ok, col_ok, QG, DG, pos_offset, HAS_GROUPS)
        x = tl.where(keep, s * inv_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        e = tl.exp2((x - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(e, 1)
        w_i = w_i * alpha + tl.sum(e * tl.where(keep, x, 0.0), 1)  # masked x is -inf and 0 * -inf = nan
        diag += tl.sum(tl.where(is_pos, x, 0.0), 1)
        m_i = m_new
    log_l = tl.log2(l_i) * LN2
    tl.store(LSE + rows, m_i + log_l, mask=row_ok)
    tl.store(LOSS + rows, (m_i - diag) + log_l, mask=row_ok)
    # d loss / d t = (s_pos - sum_j P_j s_j) / t^2 = (x_pos - sum_j P_j x_j) / t: a difference of two values
    # built from the same x, never of a product (ptxas contracts a*b - c into an FMA, whose unrounded product
    # would leave a residue where torch gives exactly 0; the first H100 run showed it)
    tl.store(DLDT + rows, (diag - w_i / l_i) * inv_t, mask=row_ok)


@triton.jit
def _dscores(s, rows, cols, row_ok, col_ok, QG, DG, LSE, G, B, pos_offset, inv_t,
             HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr):
    """dL/dS tile: (1/t)(g_r[i] P_ij + [j<B] g_c[j] Pc_ij - [j == i+o](g_r[i] + g_c[i])), masked -> 0."""
    is_pos, keep = _keep(rows, cols, row_ok, col_ok, QG, DG, pos_offset, HAS_GROUPS)
    # natural units, as in the forward: x - lse is exact where the forward's sum was a single term (P = 1). The
    # select keeps x a rounded product: `s * inv_t - lse` would be contracted into one FMA (unrounded product)
    # and leave a residue there; the forward's x goes through the same select.
    x = tl.where(keep, s * inv_t, float("-inf"))
    lse_r = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g_r = tl.load(G + rows, mask=row_ok, other=0.0)
    p = tl.where(keep, tl.exp2((x - lse_r[:, None]) * LOG2E) * g_r[:, None], 0.0)
    g_diag = g_r
    if SYMMETRIC:
        col_c = col_ok & (cols < B)
        lse_c = tl.load(LSE + B + cols, mask=col_c, other=0.0)
        g_c = tl.load(G + B + cols, mask=col_c, other=0.0)
        p += tl.where(keep & col_c[None, :], tl.exp2((x - lse_c[None, :]) * LOG2E) * g_c[None, :], 0.0)
        g_diag += tl.load(G + B + rows, mask=row_ok, other=0.0)
    p = tl.where(is_pos, p - g_diag[:, None], p)
    return p * inv_t


# ---------------------------------------------------------------- blocked backward
@triton.autotune(configs=_configs("dscores"), key=["K", "IEEE", "HAS_GROUPS", "SYMMETRIC"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dscores_kernel(Q, D, T, QG, DG, LSE, G, DS, B, N, K, row0, col0, n_rows, n_cols, pos_offset,
                        stride_q, stride_d, stride_ds,
                        HAS_GROUPS: tl.constexpr, SYMMETRIC: tl.constexpr, IEEE: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DS (n_rows, n_cols) in the input dtype = dL/dS[row0:row0+n_rows, col0:col0+n_cols] (masked entries 0).
    Grid: (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N)); `B`, `N` are the full sizes (for masks and LSE)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lr = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = row0 + lr
    cols = col0 + lc
    row_ok = (lr < n_rows) & (rows < B)
    col_ok = (lc < n_cols) & (cols < N)
    inv_t = 1.0 / tl.load(T).to(tl.float32)
    s = _scores(Q, D, rows, cols, row_ok, col_ok, K, stride_q, stride_d, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    ds = _dscores(s, rows, cols, row_ok, col_ok, QG, DG, LSE, G, B, pos_offset, inv_t, HAS_GROUPS, SYMMETRIC)
    ptr = DS + lr[:, None] * stride_ds + lc[None, :]
    tl.store(ptr, ds.to(DS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# M in the key: the dq and ddocs GEMMs of one dS block have different row counts when the block is not square
@triton.autotune(configs=_configs("gemm"), key=["M", "N", "IEEE"], prune_configs_by=_PRUNE_MM,
                 restore_value=["C"])  # tuning runs the kernel several times: C must not accumulate them
@triton.jit
def _mm_acc_kernel(A, Bm, C, OUT, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                   FIRST: tl.constexpr, LAST: tl.constexpr, N_FASTEST: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One accumulation step of OUT (M, N) = sum over dS blocks of A (M, K) @ Bm (K, N); A and Bm any strides (a
    transposed view is fine), C (M, N) fp32 row-major the running sum, fp32 accumulation over all of K.
    FIRST: C is not read (no zero fill); LAST: the total goes straight to OUT (the gradient's dtype; no cast
    pass), else to C. Grid: 1-D over the (M / BLOCK_M) x (N / BLOCK_N) tiles. N_FASTEST orders them along N
    first: consecutive programs share their A row panel (the big dS operand, 128 MiB at the target size, not
    L2-resident) and all of Bm (d = 768 columns, a few MB) stays in L2, so A streams from HBM about once;
    M-fastest order re-reads each A panel once per wave of N tiles."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    if N_FASTEST:
        pid_m = pid // n_n
        pid_n = pid % n_n
    else:
        pid_m = pid % n_m
        pid_n = pid // n_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptr = Bm + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptr, mask=m_ok[:, None] & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptr, mask=(rk[:, None] < k_left) & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    offs = rm[:, None] * stride_cm + rn[None, :]
    io = m_ok[:, None] & n_ok[None, :]
    if not FIRST:
        acc += tl.load(C + offs, mask=io, other=0.0)
    if LAST:
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=io)
    else:
        tl.store(C + offs, acc, mask=io)
