"""Triton kernels of the fused bottleneck adapter (plain, and followed by residual + LayerNorm).

One kernel family covers three variants through constexpr flags (z = x + res when HAS_RES):
  plain              y = x + s*f(x)                                  (HAS_RES=0, PRE_LN=0, POST_LN=0)
  Houlsby / parallel y = LN(x + s*f(x) + res)                        (HAS_RES=1, PRE_LN=0, POST_LN=1)
  Pfeiffer (seq_bn)  y = LN(z + s*f(LN(z)))       (PRE_LN=1, POST_LN=1; forward: x = h, res = t, writing z;
                                                   backward: x = z, HAS_RES=0)
with f(u) = act(u @ Wdᵀ + bd) @ Wuᵀ + bu and one LayerNorm (weight, bias) used for both LNs.

Forward: one program per BLOCK_M rows walks the row block in d-chunks of BLOCK_K columns: it accumulates
the r-wide pre-activation a = u @ Wdᵀ on chip (with the Pfeiffer LayerNorm's statistics in the same pass), then
(post-LN) the row statistics of v = z + s*(act(a) @ Wuᵀ + bu), then writes y chunk by chunk. The chunk
re-reads hit L1/L2 (a row block is a few tens of KB), so HBM sees x (and res) read once and y written once;
shared-memory operands are (BLOCK_K, BLOCK_R) weight chunks whatever d is. LayerNorm statistics take one pass
(per-chunk mean and centred sum of squares, merged by Chan's rule: as stable as two passes), in fp32 (fp64).
Pfeiffer with a residual: z = x + res is rounded to the input dtype (as torch's add) and, for a backward, written
in the first pass (WRITE_Z), so the backward reads z alone and no separate add kernel runs.
Mixed precision (autocast's mix): 16-bit x and weights with an fp32 res and LayerNorm: the dots follow the
weights' dtype (tensor cores), everything else fp32, z and y fp32.
Backward, no atomics, deterministic:
  1. `_bwd_rows_kernel` (one program per BLOCK_M rows) recomputes the forward the same way and writes dx (and
     dres) and the r-wide act(a) and d(a) rows (weights' dtype, small side buffers). Passes over the row block
     (Pfeiffer): LN-1 statistics with a (`_recompute_h`); LN-2 statistics with the LN-2 backward's row means
     (`_post_stats_bwd`); dh = s*dv Wu, which also stores dv (Houlsby: as dres, an output; else to a scratch);
     dx from the stored dv (no recompute of v). The LN-1 backward's row means come from a and da without a
     pass: 4 passes (9 in the version the first H100 run timed; the forward: 3 instead of 6).
     It also writes per-row-block column sums of the bias and LayerNorm gradients (da's too), all reduced by one
     sum, and (Pfeiffer in fp32 / fp64 or autocast's mix only) u = LN(z).
  2. dW_up = s (dvᵀ h) and dW_down = daᵀ u as two GEMMs (cuBLAS) over what the row kernel wrote, the block sums
     reduced in a fixed order. 16-bit Pfeiffer takes dW_down from z itself, (qᵀ z - Σ q mean1) ∘ w + (Σ da) ⊗ b
     with q = da rstd1: the GEMM reads z instead of a u written for it (H100 run 7: row kernel 644 -> 624 us).
     A parameter-gradient kernel that re-read x and dy per d-chunk and reduced in registers, one partial per
     row split (EFFIR_ADAPTER_PARAMS=kernel), was measured slower on the H100 (run 3,
     bench/results/gpu_h100_2026-11-27_run3, seq_bn at 65536 tokens, d = 768: 2.19 ms against 1.66 ms with the
     GEMMs) and removed.
A two-pass design that took v's statistics and the gradient through the post-LayerNorm from sums of the first
pass and the up-projection's moments (fewer passes, split 16-bit dots) was measured slower on the H100 (run 6,
bench/results/gpu_h100_2026-11-27_run6: row backward 1505 us against 510 us, post-LN at 65536 tokens, d = 768)
and removed.
A split backward (row kernel with passes 1-3 writing only r-wide rows and 8 row scalars, then one kernel streaming
over d-chunks for dx and all parameter gradients accumulated on chip, no GEMMs) was measured slower on the H100
(run 9, bench/results/gpu_h100_2026-11-27_run9, seq_bn at 65536 tokens, d = 768: backward 834-1148 us over four
tile choices against 709 us, the column kernel alone 465-550 us) and removed.
Thin launchers only; autograd lives in effir/ops.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels._knobs import env_choice
from kernels._mm import mm_unrounded

ACT_IDS = {"relu": 0, "gelu": 1, "silu": 2}


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # IEEE: fp32/fp64 operands take exact IEEE products (no TF32), as torch's fp32 matmul does.
    # 16-bit operands: tensor-core dot with fp32 accumulation. Triton 3.6's CPU interpreter computes
    # bf16 dots wrongly, so there (IEEE is set by the launcher) 16-bit operands are widened to fp32 first:
    # bf16 x bf16 products are exact in fp32, so the result equals the fp32-accumulated tensor-core dot.
    if IEEE:
        if a.dtype == tl.bfloat16 or a.dtype == tl.float16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(a, 0.0)
    elif ACT == 1:
        return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        return a * tl.sigmoid(a)


@triton.jit
def _act_grad(a, ACT: tl.constexpr):
    if ACT == 0:
        return tl.where(a > 0.0, 1.0, 0.0).to(a.dtype)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        return cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        sg = tl.sigmoid(a)
        return sg * (1.0 + a * (1.0 - sg))


@triton.jit
def _load_z(X, RES, rows, rmask, k0, D, BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr, PRE_LN: tl.constexpr,
            CDT: tl.constexpr):
    """(z chunk (BLOCK_M, BLOCK_K) in CDT with zeros outside, x chunk, cols, mask, offsets). Pfeiffer (PRE_LN) with
    a residual: z = x + res rounded to the input dtype, as torch's add gives it and as the forward writes it for
    the backward (which then reads that z): forward and backward see the same z. A mixed pair (16-bit x, fp32
    res) sums in fp32, as torch's promoting add."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(CDT)
    z = x
    if HAS_RES:
        z = z + tl.load(RES + offs, mask=mask, other=0.0).to(CDT)
        if PRE_LN and X.dtype.element_ty == RES.dtype.element_ty:
            z = z.to(X.dtype.element_ty).to(CDT)
    return z, x, cols, mask, offs


@triton.jit
def _u_chunk(z, x, cols, mask, LNW, LNB, mean1, rstd1, D, PRE_LN: tl.constexpr, CDT: tl.constexpr):
    """Adapter input chunk: LN(z) (Pfeiffer) or x; also uhat (normalised z, zero outside)."""
    if PRE_LN:
        w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
        b = tl.load(LNB + cols, mask=cols < D, other=0.0).to(CDT)
        uhat = tl.where(mask, (z - mean1[:, None]) * rstd1[:, None], 0.0)
        return uhat * w[None, :] + tl.where(mask, b[None, :], 0.0), uhat
    else:
        return x, x


@triton.jit
def _v_chunk(z, h, WU, BU, cols, mask, rr, D, R, scaling, CDT: tl.constexpr, IEEE: tl.constexpr):
    """v chunk = z + scaling * (h @ Wuᵀ + bu) over the chunk's columns (zero outside)."""
    wut = tl.load(WU + cols[None, :] * R + rr[:, None], mask=(cols < D)[None, :] & (rr < R)[:, None], other=0.0)
    bu = tl.load(BU + cols, mask=cols < D, other=0.0).to(CDT)
    p = _mm(h.to(wut.dtype), wut, IEEE).to(CDT) + bu[None, :]
    return tl.where(mask, z + scaling * p, 0.0)


@triton.jit
def _merge_stats(mean, m2, chunk, mask, k0, D, BLOCK_K: tl.constexpr, CDT: tl.constexpr):
    """Fold one (BLOCK_M, BLOCK_K) chunk (zero outside `mask`) into per-row (mean, M2) over the columns before k0:
    the chunk's own mean and centred sum of squares, merged by Chan et al.'s parallel rule. One pass over the
    row, and as stable as two (no E[z²] - mean² cancellation)."""
    # counts in CDT: exact (below 2**24), and ratios such as n_b / n = 1/3 are then rounded in fp64 by the fp64
    # kernels (in fp32 they cost a ~1e-8 relative error in the mean once chunk means differ)
    n_a = tl.cast(k0, CDT)
    n_b = tl.cast(tl.minimum(D - k0, BLOCK_K), CDT)
    mean_b = tl.sum(chunk, axis=1) / n_b
    dz = tl.where(mask, chunk - mean_b[:, None], 0.0)
    m2_b = tl.sum(dz * dz, axis=1)
    n = n_a + n_b
    delta = mean_b - mean
    return mean + delta * (n_b / n), m2 + m2_b + delta * delta * (n_a * n_b / n)


@triton.jit
def _wd_ln_kernel(WD, LNW, LNB, CWB, D, R, PAD_R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  CDT: tl.constexpr):
    """CWB (2 PAD_R,) in CDT = [Wd w | Wd b]: the down-projection applied to the LayerNorm's weight and bias
    (zero beyond R), exact products and CDT sums, read by every row block. One program per BLOCK_R rows of Wd, in
    chunks of BLOCK_K columns: a few serial steps per call (a single program walking 64-column chunks took 9.5 us,
    H100 run 8)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cw = tl.zeros((BLOCK_R,), dtype=CDT)
    cb = tl.zeros((BLOCK_R,), dtype=CDT)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=(rr < R)[:, None] & (cols < D)[None, :],
                     other=0.0).to(CDT)
        cw += tl.sum(wd * tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)[None, :], axis=1)
        cb += tl.sum(wd * tl.load(LNB + cols, mask=cols < D, other=0.0).to(CDT)[None, :], axis=1)
    tl.store(CWB + rr, cw, mask=rr < PAD_R)
    tl.store(CWB + PAD_R + rr, cb, mask=rr < PAD_R)


@triton.jit
def _recompute_h(X, RES, WD, BD, LNW, LNB, CWB, Z, rows, rmask, rr, D, R, eps, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                 PRE_LN: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr, WRITE_Z: tl.constexpr):
    """(a, act(a), mean1, rstd1): the r-wide pre-activation, accumulated
    over d-chunks on chip, in one pass over the row also with the Pfeiffer LayerNorm in front. There
    a = LN(z) Wdᵀ + bd is taken apart as
        a = rstd (((z - c) w) Wdᵀ - (mean - c) (w Wdᵀ)) + b Wdᵀ + bd
    with c the row's first-chunk mean, so the statistics (`_merge_stats`) and the product share the pass. The
    shift c keeps the tensor-core operand (z - c) w centred (|mean - c| ~ std / sqrt(BLOCK_K)), so rounding it
    to 16 bits costs what rounding LN(z) would, whatever the row's mean. cw = w Wdᵀ and cb = b Wdᵀ, (BLOCK_R,)
    fp32 (fp64) sums, are read from CWB (`_wd_ln_kernel`, once per call) instead of a walk over Wd per row
    block (H100 run 8: forward 296 against 304 us, row backward 581 against 598 with the walk, which the
    backward took twice; `_wd_ln_kernel` itself 2 x 9.5 us). Without the walk ptxas reports the row backward's
    wgmma serialised (C7515), which it did not with it: measured faster all the same. Folding cw / cb into this
    pass's dot instead raised the forward from 168 to 255 registers.
    WRITE_Z (Pfeiffer forward with a residual): z = x + res is also stored to Z in this pass, for the backward."""
    bd = tl.load(BD + rr, mask=rr < R, other=0.0).to(CDT)
    a = tl.zeros((BLOCK_M, BLOCK_R), dtype=CDT)
    mean1 = tl.zeros((BLOCK_M,), dtype=CDT)
    m2 = tl.zeros((BLOCK_M,), dtype=CDT)
    shift = tl.zeros((BLOCK_M,), dtype=CDT)
    cw = tl.zeros((BLOCK_R,), dtype=CDT)
    cb = cw
    if PRE_LN:
        cw = tl.load(CWB + rr)
        cb = tl.load(CWB + BLOCK_R + rr)
        z0, _x0, _c0, _m0, _o0 = _load_z(X, RES, rows, rmask, 0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        shift = tl.sum(z0, axis=1) / tl.minimum(D, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        z, x, cols, mask, offs = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        if WRITE_Z:
            tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)
        if PRE_LN:
            mean1, m2 = _merge_stats(mean1, m2, z, mask, k0, D, BLOCK_K, CDT)
        # Wdᵀ chunk (BLOCK_K, BLOCK_R) of w_down (R, D); padding is zero so it adds nothing
        wdt = tl.load(WD + rr[None, :] * D + cols[:, None], mask=(rr < R)[None, :] & (cols < D)[:, None],
                      other=0.0)
        if PRE_LN:
            w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
            zc = tl.where(mask, (z - shift[:, None]) * w[None, :], 0.0)
            a += _mm(zc.to(wdt.dtype), wdt, IEEE).to(CDT)
        else:
            a += _mm(x.to(wdt.dtype), wdt, IEEE).to(CDT)
    rstd1 = tl.zeros((BLOCK_M,), dtype=CDT)
    if PRE_LN:
        rstd1 = 1.0 / tl.sqrt(m2 / D + eps)
        a = rstd1[:, None] * (a - (mean1 - shift)[:, None] * cw[None, :]) + cb[None, :]
    a += bd[None, :]
    return a, _act(a, ACT), mean1, rstd1


@triton.jit
def _post_stats(X, RES, WU, BU, h, rows, rmask, rr, D, R, scaling, eps, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, CDT: tl.constexpr,
                IEEE: tl.constexpr):
    """(mean2, rstd2) of v = z + s*p over the row: one pass, p recomputed per chunk (`_merge_stats`)."""
    mean = tl.zeros((BLOCK_M,), dtype=CDT)
    m2 = tl.zeros((BLOCK_M,), dtype=CDT)
    for k0 in range(0, D, BLOCK_K):
        z, _x, cols, mask, _o = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        v = _v_chunk(z, h, WU, BU, cols, mask, rr, D, R, scaling, CDT, IEEE)
        mean, m2 = _merge_stats(mean, m2, v, mask, k0, D, BLOCK_K, CDT)
    return mean, 1.0 / tl.sqrt(m2 / D + eps)


@triton.jit
def _post_stats_bwd(X, RES, DY, WU, BU, LNW, h, rows, rmask, rr, D, R, scaling, eps, BLOCK_M: tl.constexpr,
                    BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, CDT: tl.constexpr,
                    IEEE: tl.constexpr):
    """(mean2, rstd2, c1, c2) in ONE pass over the row: the statistics of v (as `_post_stats`) and the two row
    means the LayerNorm backward needs, c1 = mean(g), c2 = mean(g * vhat) with g = dy * ln_weight. c2 needs the
    final mean of v; the centred co-moment S = sum g (v - mean) is merged chunk by chunk with the rule that
    merges the variance (moving a chunk's sum to the new mean adds G (old mean - new mean)), so no sum of g v is
    ever taken and nothing cancels."""
    mean = tl.zeros((BLOCK_M,), dtype=CDT)
    m2 = tl.zeros((BLOCK_M,), dtype=CDT)
    cm = tl.zeros((BLOCK_M,), dtype=CDT)  # S: sum g (v - mean) over the columns so far
    gs = tl.zeros((BLOCK_M,), dtype=CDT)  # G: sum g over the columns so far
    for k0 in range(0, D, BLOCK_K):
        z, _x, cols, mask, offs = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        v = _v_chunk(z, h, WU, BU, cols, mask, rr, D, R, scaling, CDT, IEEE)
        w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(CDT) * w[None, :]
        n_a = tl.cast(k0, CDT)  # in CDT, as in `_merge_stats`
        n_b = tl.cast(tl.minimum(D - k0, BLOCK_K), CDT)
        n = n_a + n_b
        mean_b = tl.sum(v, axis=1) / n_b
        dv = tl.where(mask, v - mean_b[:, None], 0.0)
        g_b = tl.sum(g, axis=1)
        delta = mean_b - mean
        cm = cm + tl.sum(g * dv, axis=1) - gs * delta * (n_b / n) + g_b * delta * (n_a / n)
        m2 = m2 + tl.sum(dv * dv, axis=1) + delta * delta * (n_a * n_b / n)
        mean = mean + delta * (n_b / n)
        gs = gs + g_b
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    return mean, rstd, gs / D, cm * rstd / D


@triton.jit
def _scalars(SC, scaling, eps, CDT: tl.constexpr):
    """(scaling, eps) in CDT. Triton passes Python floats as fp32, which would round 0.7 or 1e-5 to ~1e-8
    relative error: the fp64 path reads them from a 2-element fp64 tensor instead (SC, see `_scalar_args`)."""
    if CDT == tl.float64:
        return tl.load(SC), tl.load(SC + 1)
    else:
        return scaling, eps


@triton.jit
def _fwd_kernel(X, RES, WD, BD, WU, BU, LNW, LNB, CWB, Y, Z, M, D, R, SC, scaling, eps,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr,
                HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, IEEE: tl.constexpr,
                CDT: tl.constexpr, WRITE_Z: tl.constexpr):
    scaling, eps = _scalars(SC, scaling, eps, CDT)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rmask = rows < M
    _a, h, _m1, _r1 = _recompute_h(X, RES, WD, BD, LNW, LNB, CWB, Z, rows, rmask, rr, D, R, eps, BLOCK_M, BLOCK_K,
                                   BLOCK_R, ACT, HAS_RES, PRE_LN, CDT, IEEE, WRITE_Z)
    h = h.to(WU.dtype.element_ty)  # as every up-projection dot takes it
    if WRITE_Z:
        # the other passes read the z this program just wrote: one tensor instead of x and res (other threads
        # wrote parts of it, hence the barrier)
        tl.debug_barrier()
        _fwd_out(Z, Z, WU, BU, LNW, LNB, Y, h, rows, rmask, rr, D, R, scaling, eps, BLOCK_M, BLOCK_K, False, PRE_LN,
                 POST_LN, CDT, IEEE)
    else:
        _fwd_out(X, RES, WU, BU, LNW, LNB, Y, h, rows, rmask, rr, D, R, scaling, eps, BLOCK_M, BLOCK_K, HAS_RES,
                 PRE_LN, POST_LN, CDT, IEEE)


@triton.jit
def _fwd_out(X, RES, WU, BU, LNW, LNB, Y, h, rows, rmask, rr, D, R, scaling, eps,
             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RES: tl.constexpr, PRE_LN: tl.constexpr,
             POST_LN: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr):
    """The forward after the pre-activation: the post-LayerNorm statistics of v = z + s*p (one pass), then y."""
    mean2 = tl.zeros((BLOCK_M,), dtype=CDT)
    rstd2 = mean2
    if POST_LN:
        mean2, rstd2 = _post_stats(X, RES, WU, BU, h, rows, rmask, rr, D, R, scaling, eps, BLOCK_M, BLOCK_K,
                                   HAS_RES, PRE_LN, CDT, IEEE)
    _write_y(X, RES, WU, BU, LNW, LNB, Y, h, rows, rmask, rr, D, R, scaling, mean2, rstd2, BLOCK_K, HAS_RES,
             PRE_LN, POST_LN, CDT, IEEE)


@triton.jit
def _write_y(X, RES, WU, BU, LNW, LNB, Y, h, rows, rmask, rr, D, R, scaling, mean2, rstd2, BLOCK_K: tl.constexpr,
             HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, CDT: tl.constexpr,
             IEEE: tl.constexpr):
    """The forward's last pass: y = LN(v) with the given statistics (POST_LN) or v, chunk by chunk."""
    # the row block's chunks were just read: these re-reads hit L1/L2, HBM sees x (and res) once
    for k0 in range(0, D, BLOCK_K):
        z, _x, cols, mask, offs = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        v = _v_chunk(z, h, WU, BU, cols, mask, rr, D, R, scaling, CDT, IEEE)
        if POST_LN:
            w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
            b = tl.load(LNB + cols, mask=cols < D, other=0.0).to(CDT)
            v = (v - mean2[:, None]) * rstd2[:, None] * w[None, :] + b[None, :]
        tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dv_chunk(dy, z, h, WU, BU, LNW, cols, mask, rr, mean2, rstd2, c1, c2, D, R, scaling,
              POST_LN: tl.constexpr, CDT: tl.constexpr, IEEE: tl.constexpr):
    """(dv, vhat) chunk: the gradient reaching v = z + s*p through the LayerNorm (or dy itself)."""
    if POST_LN:
        v = _v_chunk(z, h, WU, BU, cols, mask, rr, D, R, scaling, CDT, IEEE)
        vhat = tl.where(mask, (v - mean2[:, None]) * rstd2[:, None], 0.0)
        w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
        return tl.where(mask, (dy * w[None, :] - c1[:, None] - vhat * c2[:, None]) * rstd2[:, None], 0.0), vhat
    else:
        return dy, dy


@triton.jit
def _bwd_rows_kernel(DY, X, RES, WD, BD, WU, BU, LNW, LNB, CWB, DX, DRES, HBUF, DABUF, ABUF, DV, U, PCOL,
                     M, D, R, PCOL_W, SC, scaling, eps,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr,
                     HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, IEEE: tl.constexpr,
                     CDT: tl.constexpr, LN_GRADS: tl.constexpr, U_FROM_Z: tl.constexpr, A_SCRATCH: tl.constexpr):
    """PCOL: (blocks, PCOL_W) per-row-block column sums (see `fused_adapter_bwd`). U_FROM_Z (Pfeiffer, 16-bit):
    u = LN(z) is not written; DABUF takes q = da * rstd1 instead of da, and PCOL's last R columns sum q * mean1,
    from which the dW_down GEMM runs over z itself (`_param_grads_gemm`). A_SCRATCH (`a_scratch`): the
    pre-activation waits in ABUF (M, R) in CDT between pass 1 and its use after pass 3."""
    scaling, eps = _scalars(SC, scaling, eps, CDT)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    rmask = rows < M
    qmask = rr < R
    # recompute the forward (nothing but the inputs was saved)
    a, h, mean1, rstd1 = _recompute_h(X, RES, WD, BD, LNW, LNB, CWB, X, rows, rmask, rr, D, R, eps, BLOCK_M, BLOCK_K,
                                      BLOCK_R, ACT, HAS_RES, PRE_LN, CDT, IEEE, False)
    # act(a) in the weights' dtype, as every up-projection dot takes it: half the registers of fp32 at 16 bits.
    # Stored now (a GEMM operand, in the weights' dtype): a store after the last pass keeps h live through it
    # (more spills), one after pass 3 made ptxas serialise the wgmma (C7515; bench/triton_aot.py)
    h = h.to(WU.dtype.element_ty)
    roffs = rows[:, None].to(tl.int64) * R + rr[None, :]
    rqmask = rmask[:, None] & qmask[None, :]
    tl.store(HBUF + roffs, h.to(HBUF.dtype.element_ty), mask=rqmask)
    if A_SCRATCH:  # a parked in global memory (L2) over passes 2-3 instead of 32 registers a thread at 64 x 64
        tl.store(ABUF + roffs, a, mask=rqmask)
    mean2 = tl.zeros((BLOCK_M,), dtype=CDT)
    rstd2 = mean2
    c1 = mean2
    c2 = mean2
    if POST_LN:
        mean2, rstd2, c1, c2 = _post_stats_bwd(X, RES, DY, WU, BU, LNW, h, rows, rmask, rr, D, R, scaling, eps,
                                               BLOCK_M, BLOCK_K, HAS_RES, PRE_LN, CDT, IEEE)
    # dh = dp @ Wu over d-chunks, dp = scaling * dv. dv (the gradient reaching v through the LayerNorm) is also
    # stored to DV (Houlsby: DV is dres itself, an output; Pfeiffer: a scratch the dW_up GEMM reads), so the
    # last pass reads it back instead of recomputing v; the column sums that need dy or v are taken here
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=CDT)
    for k0 in range(0, D, BLOCK_K):
        z, _x, cols, mask, offs = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(CDT)
        dv, vhat = _dv_chunk(dy, z, h, WU, BU, LNW, cols, mask, rr, mean2, rstd2, c1, c2, D, R, scaling,
                             POST_LN, CDT, IEEE)
        wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=(cols < D)[:, None] & qmask[None, :], other=0.0)
        dh += _mm((scaling * dv).to(wu.dtype), wu, IEEE).to(CDT)
        if POST_LN:
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)
        # this row block's column sums of the bias / LayerNorm gradients (masked rows add exact zeros):
        # [s*dv | LN weight | LN bias]; the pre-LN's share of the last two is added in the last pass
        pcol = PCOL + pid.to(tl.int64) * PCOL_W + cols
        cmask = cols < D
        tl.store(pcol, tl.sum(scaling * dv, axis=0), mask=cmask)
        if LN_GRADS and (PRE_LN or POST_LN):
            lw = tl.zeros((BLOCK_K,), dtype=CDT)
            lb = tl.zeros((BLOCK_K,), dtype=CDT)
            if POST_LN:  # y = vhat * w + b
                lw += tl.sum(dy * vhat, axis=0)
                lb += tl.sum(dy, axis=0)
            tl.store(pcol + D, lw, mask=cmask)
            tl.store(pcol + 2 * D, lb, mask=cmask)
    if A_SCRATCH:  # other threads of this program may have stored these elements (layouts differ): a barrier
        tl.debug_barrier()
        a = tl.load(ABUF + roffs, mask=rqmask, other=0.0)
    da = dh * _act_grad(a, ACT)
    e1 = tl.zeros((BLOCK_M,), dtype=CDT)
    e2 = e1
    if PRE_LN:
        # LayerNorm-1 backward needs the row means of g1 = du * w and g1 * uhat, du = da @ Wd. No pass over the
        # row: sum_d du w = da . (Wd w) and sum_d du w uhat = da . ((uhat * w) @ Wdᵀ) = da . (a - bd - Wd b),
        # the pre-activation a already holding (uhat * w + b) @ Wdᵀ + bd. cw = Wd w, cb = Wd b re-read here (two
        # r-vectors, L2 hits): kept live from pass 1 they cost ~130 B more spill
        cw = tl.load(CWB + rr)
        cb = tl.load(CWB + BLOCK_R + rr)
        bd = tl.load(BD + rr, mask=qmask, other=0.0).to(CDT)
        e1 = tl.sum(da * cw[None, :], axis=1) / D
        e2 = tl.sum(da * (a - bd[None, :] - cb[None, :]), axis=1) / D
    da = da.to(WD.dtype.element_ty)  # what the dot below takes: half the registers of fp32 at 16 bits
    # the stores above are read back below by other threads of this program
    tl.debug_barrier()
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        if POST_LN:  # dv as stored: the value dres (Houlsby) and the dW_up GEMM see
            dv = tl.load(DV + offs, mask=mask, other=0.0).to(CDT)
        else:
            dv = tl.load(DY + offs, mask=mask, other=0.0).to(CDT)
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=qmask[:, None] & (cols < D)[None, :], other=0.0)
        du = _mm(da, wd, IEEE).to(CDT)
        if PRE_LN:
            z, x, _c, _m, _o = _load_z(X, RES, rows, rmask, k0, D, BLOCK_K, HAS_RES, PRE_LN, CDT)
            u, uhat = _u_chunk(z, x, cols, mask, LNW, LNB, mean1, rstd1, D, PRE_LN, CDT)
            w = tl.load(LNW + cols, mask=cols < D, other=0.0).to(CDT)
            dz = dv + tl.where(mask, (du * w[None, :] - e1[:, None] - uhat * e2[:, None]) * rstd1[:, None], 0.0)
            tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
            if HAS_RES:
                tl.store(DRES + offs, dz.to(DRES.dtype.element_ty), mask=mask)
            if not U_FROM_Z:
                tl.store(U + offs, u.to(U.dtype.element_ty), mask=mask)  # the dW_down GEMM's operand
            if LN_GRADS:  # u = uhat * w + b, the same LayerNorm: add its share to pass 3's sums
                pcol = PCOL + pid.to(tl.int64) * PCOL_W + cols
                cmask = cols < D
                tl.store(pcol + D, tl.load(pcol + D, mask=cmask, other=0.0) + tl.sum(du * uhat, axis=0),
                         mask=cmask)
                tl.store(pcol + 2 * D, tl.load(pcol + 2 * D, mask=cmask, other=0.0) + tl.sum(du, axis=0),
                         mask=cmask)
        else:
            tl.store(DX + offs, (dv + du).to(DX.dtype.element_ty), mask=mask)  # Houlsby: dres = dv is stored
    # this row block's column sums of da as rounded (db_down), after the three d-wide ones
    tl.store(PCOL + pid.to(tl.int64) * PCOL_W + 3 * D + rr,
             tl.sum(tl.where(rqmask, da.to(DABUF.dtype.element_ty).to(CDT), 0.0), axis=0), mask=qmask)
    if U_FROM_Z:
        # dW_down = daᵀ u with u = (z - mean1) rstd1 w + b, as (qᵀ z - Σ q mean1) w + (Σ da) b, q = da rstd1: the
        # GEMM reads the z it has anyway instead of a u written here (M d 16-bit bytes less). The sum takes q as
        # stored, so the GEMM's qᵀ z and it cancel exactly what they share
        q = (da.to(CDT) * rstd1[:, None]).to(DABUF.dtype.element_ty)
        tl.store(DABUF + roffs, q, mask=rqmask)
        tl.store(PCOL + pid.to(tl.int64) * PCOL_W + 3 * D + R + rr,
                 tl.sum(tl.where(rqmask, q.to(CDT) * mean1[:, None], 0.0), axis=0), mask=qmask)
    else:
        tl.store(DABUF + roffs, da.to(DABUF.dtype.element_ty), mask=rqmask)


def _blocks(d: int, r: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_K, BLOCK_R) defaults: rows per program, d-chunk width, padded r (tl.dot needs >= 16).

    Register tiles are (BLOCK_M, BLOCK_R) for the r-wide intermediate and (BLOCK_M, BLOCK_K) for a d-chunk;
    shared-memory operands are (BLOCK_K, BLOCK_R) weight chunks, so no size depends on d.
    """
    budget = 2048 if dtype == torch.float64 else 4096
    block_r = max(16, triton.next_power_of_2(r))
    block_k = max(16, min(32 if dtype == torch.float64 else 64, triton.next_power_of_2(d)))
    block_m = max(16, min(64, budget // block_r))
    return block_m, block_k, block_r


_TILE_CHOICES = tuple(f"{m}x{k}x{w}" for m in (16, 32, 64, 128, 256) for k in (16, 32, 64, 128, 256)
                      for w in (1, 2, 4, 8, 16))


def _tile(kernel: str, d: int, r: int, dtype: torch.dtype, mixed: bool = False):
    """(BLOCK_M, BLOCK_K, BLOCK_R, num_warps) of the forward (kernel="fwd") or row-gradient ("bwd") kernel;
    `mixed`: autocast's mix (fp32 activations with 16-bit weights of `dtype`), more registers per element.

    16-bit inputs read EFFIR_ADAPTER_{FWD,BWD}_TILE, else EFFIR_ADAPTER_TILE, as
    "BLOCK_MxBLOCK_KxWARPS" (e.g. "128x64x8"): more rows per program re-read the weight chunks (from L2) for
    fewer programs, wider chunks mean fewer, larger tensor-core steps, both at the cost of registers. Timed side
    by side by bench/gpu/adapter.py. fp32 / fp64 always take the defaults (their tests pin the rounding)."""
    env = (os.environ.get(f"EFFIR_ADAPTER_{kernel.upper()}_TILE"), os.environ.get("EFFIR_ADAPTER_TILE"))
    return _tile_cached(kernel, d, r, dtype, mixed, env)


@functools.lru_cache(maxsize=256)
def _tile_cached(kernel: str, d: int, r: int, dtype: torch.dtype, mixed: bool, env: tuple):
    # cached: every call of the op asks, and triton.next_power_of_2 alone costs microseconds of host time
    bm, bk, br = _blocks(d, r, dtype)
    warps = _warps(bm, bk, br)
    if dtype in (torch.float16, torch.bfloat16):
        bm, bk, warps = (_TILE_16BIT_MIXED if mixed else _TILE_16BIT).get(kernel, _TILE_16BIT[kernel])
        v = env_choice(f"EFFIR_ADAPTER_{kernel.upper()}_TILE", _TILE_CHOICES, None)
        if v is None:
            v = env_choice("EFFIR_ADAPTER_TILE", _TILE_CHOICES, None)
        if v is not None:
            bm, bk, warps = (int(x) for x in v.split("x"))
        bk = max(16, min(bk, triton.next_power_of_2(d)))  # no chunk wider than the row needs
    return bm, bk, br, warps


# 16-bit defaults (BLOCK_M, BLOCK_K, warps), the fastest per kernel in the H100 tile sweep of run 4
# (bench/results/gpu_h100_2026-11-27_run4, seq_bn at 65536 tokens, d = 768, r = 48, profiler times): forward
# 306 us at 32x128x4 against 513 at the former 64x64x8; row-gradient kernel 641 us at 64x64x4 against 971.
# Four warps and short row blocks win, plausibly because more programs per SM hide the chunk loops' load latency
# (the 8-warp tiles ran at 12.5% occupancy, register-bound, in run 3's Nsight Compute counters).
# The row-gradient kernel at 64x64x4 needs more than the 255 registers a thread has and spills (56-356 B per
# thread on sm_90 with the LayerNorm variants at its 3 pipeline stages, bench/results/triton_aot_sm90.json), yet
# measured fastest: 641 us against 784 us at 32x64x4, which does not spill (runs 4 and 5).
_TILE_16BIT = {"fwd": (32, 128, 4), "bwd": (64, 64, 4)}
# Autocast's mix: the row backward reads fp32 z and dy, and the 64x64 tile then spills 616 B per thread on sm_90;
# 32x32 on 8 warps does not (bench/results/triton_aot_sm90.json, "mixed")
_TILE_16BIT_MIXED = {"bwd": (32, 32, 8)}


_STAGES_16BIT = {"fwd": "2", "bwd": "3"}  # num_stages defaults, see `_stages`
_MAXNREG_CHOICES = ("96", "128", "152", "168", "184", "200", "224")


def _stages(kernel: str, *tensors: torch.Tensor) -> int:
    """Software-pipelining depth (num_stages) of the forward ("fwd") or row-gradient ("bwd") kernel's chunk loops.
    16-bit: forward 2, row gradients 3, or EFFIR_ADAPTER_{FWD,BWD}_STAGES (1-4): deeper pipelines keep more chunk
    loads in flight, at the cost of shared memory (fewer programs per SM; a large tile set by EFFIR_ADAPTER_*_TILE
    may then need fewer stages). H100 run 10 (bench/results/gpu_h100_2026-11-27_run10, 65536 tokens, d = 768,
    profiler times): row kernel at 3 stages 535 / 480 us (seq_bn / post-LN) against 568 / 523 at 2, 580 at 1 and
    734 at 4; forward at 2 stages 297 us against 318 at 3 or 4 and 336 at 1 (seq_bn; post-LN 271 at 3, 274 at 2).
    fp32 / fp64 (and autocast's mix): 1, their multi-buffered (BLOCK_M, BLOCK_K) / (BLOCK_K, BLOCK_R) fp32 tiles
    would overflow shared memory."""
    if not all(t.element_size() == 2 for t in tensors if t is not None):
        return 1
    return int(env_choice(f"EFFIR_ADAPTER_{kernel.upper()}_STAGES", ("1", "2", "3", "4"), _STAGES_16BIT[kernel]))


def _maxnreg(kernel: str) -> dict:
    """Launch option capping the forward ("fwd") or row-gradient ("bwd") kernel's registers per thread: {} by
    default (ptxas chooses), or {"maxnreg": n} from EFFIR_ADAPTER_{FWD,BWD}_MAXNREG. Programs per SM are bound by
    registers (4 warps x 32 threads x n of the SM's 65536): the 16-bit forward takes 184 a thread at seq_bn, two
    programs per SM; 168 would allow three, 128 four, at the cost of spills (bench/triton_aot.py reports them), for
    a GPU run to time against the default (bench/gpu/adapter.py)."""
    v = env_choice(f"EFFIR_ADAPTER_{kernel.upper()}_MAXNREG", _MAXNREG_CHOICES, None)
    return {} if v is None else {"maxnreg": int(v)}


def _warps(bm: int, bk: int, br: int) -> int:
    # four (BLOCK_M, BLOCK_R) and three (BLOCK_M, BLOCK_K) fp32 tiles live at once in the backward: spread them
    return 8 if bm * max(bk, br) >= 4096 else 4


def _flags(x: torch.Tensor, w: torch.Tensor | None = None):
    # compute dtype of all elementwise math and accumulators: fp32, or fp64 for fp64 inputs; the dots follow the
    # weights' dtype w (16-bit weights with fp32 activations: autocast's mix, tensor-core dots)
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    w = x if w is None else w
    return dict(IEEE=interp or w.dtype in (torch.float32, torch.float64),
                CDT=tl.float64 if x.dtype == torch.float64 else tl.float32)


def _scalar_args(x: torch.Tensor, scaling: float, eps: float):
    """(SC, scaling, eps) kernel arguments: SC holds both in fp64 for fp64 inputs (read there), else x (unread)."""
    if x.dtype != torch.float64:
        return x, float(scaling), float(eps)
    sc = torch.empty(2, dtype=torch.float64, device=x.device)  # filled by kernels: no host-to-device copy, which
    sc[0], sc[1] = float(scaling), float(eps)                   # would synchronise the stream (and break capture)
    return sc, float(scaling), float(eps)


def fused_adapter_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                      eps: float, pre_ln: bool, post_ln: bool, z_out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, d) of one variant (see module doc). x, res: (M, d) contiguous; res/ln_* may be None. One dtype, or
    mixed: 16-bit x and adapter weights, fp32 res and LayerNorm (y then fp32, dots on 16-bit operands).
    z_out (Pfeiffer with res only): an (M, d) tensor of y's dtype that receives z = x + res (rounded as torch's add),
    written in the pass that reads it anyway, so the backward can take z alone (`fused_adapter_bwd(dy, z, None,
    ...)`)."""
    m, d = x.shape
    r = w_down.shape[0]
    if z_out is not None and not (pre_ln and res is not None):
        raise ValueError("z_out is only written by the Pfeiffer variant (pre_ln=True) with a residual res")
    y = torch.empty(x.shape, dtype=x.dtype if res is None else torch.promote_types(x.dtype, res.dtype),
                    device=x.device)
    bm, bk, br, warps = _tile("fwd", d, r, w_down.dtype)
    dummy = x  # never read when the flag is off
    lnw = ln_weight if ln_weight is not None else dummy
    lnb = ln_bias if ln_bias is not None else dummy
    _fwd_kernel[(triton.cdiv(m, bm),)](
        x, res if res is not None else dummy, w_down, b_down, w_up, b_up, lnw, lnb,
        _wd_ln(w_down, ln_weight, ln_bias, br, x) if pre_ln else dummy, y,
        z_out if z_out is not None else dummy, m, d, r, *_scalar_args(x, scaling, eps), BLOCK_M=bm, BLOCK_K=bk,
        BLOCK_R=br, ACT=ACT_IDS[activation], HAS_RES=res is not None, PRE_LN=pre_ln, POST_LN=post_ln,
        num_warps=warps, num_stages=_stages("fwd", x, res), WRITE_Z=z_out is not None, **_maxnreg("fwd"),
        **_flags(x, w_down))
    return y


def a_scratch(pre_ln: bool) -> bool:
    """Whether the row-gradient kernel parks its (BLOCK_M, BLOCK_R) fp32 pre-activation in an (M, r) scratch over
    passes 2-3 instead of registers: EFFIR_ADAPTER_A_SCRATCH "auto" (default: with the Pfeiffer LayerNorm in front,
    `pre_ln`), "1" always, "0" never. It costs 2 x M r x 4 bytes of (mostly L2) traffic and frees 32 registers a
    thread at 64 x 64: on sm_90 the 16-bit seq_bn relu kernel spills 56 B a thread instead of 344
    (bench/triton_aot.py). H100 runs 9 and 10 (bench/results/gpu_h100_2026-11-27_run9, _run10; 65536 tokens,
    d = 768): seq_bn row kernel 567 / 568 us against 582 / 583 in registers, but post-LN alone 523 against 505 (its
    kernel spills less to begin with: 156-280 B), hence per variant."""
    v = env_choice("EFFIR_ADAPTER_A_SCRATCH", ("auto", "0", "1"), "auto")
    return pre_ln if v == "auto" else v == "1"


def _wd_ln(w_down, ln_weight, ln_bias, block_r: int, x) -> torch.Tensor:
    """[Wd w | Wd b] (2 block_r,) in x's compute dtype (`_wd_ln_kernel`): one launch per call, a program per 16 rows."""
    cwb = torch.empty(2 * block_r, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    d = w_down.shape[1]
    rows = min(block_r, 16)
    _wd_ln_kernel[(triton.cdiv(block_r, rows),)](w_down, ln_weight, ln_bias, cwb, d, w_down.shape[0], block_r,
                                                BLOCK_K=max(16, min(256, triton.next_power_of_2(d))), BLOCK_R=rows,
                                                CDT=_flags(x)["CDT"], num_warps=4)
    return cwb


def fused_adapter_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str,
                      scaling: float, eps: float, pre_ln: bool, post_ln: bool, ln_param_grads: bool = True):
    """(dx, dres|None, dw_down, db_down, dw_up, db_up, dln_weight|None, dln_bias|None); all inputs contiguous,
    dtypes as `fused_adapter_fwd` takes them (x, res, dy; dx / dres like x / res).
    ln_param_grads=False (frozen LayerNorm): the two LayerNorm gradients are not computed and come back
    uninitialised (torch.empty: no kernel fills them; the ops' autograd drops them)."""
    m, d = x.shape
    r = w_down.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    # autocast's mix (fp32 z and dy, 16-bit weights) has fp32 tiles in the registers: its own defaults
    mixed = any(t is not None and t.dtype != w_down.dtype for t in (x, res, dy))
    bm, bk, br, warps = _tile("bwd", d, r, w_down.dtype, mixed)
    dx = torch.empty_like(x)
    dres = torch.empty_like(res) if res is not None else None
    # act(a), d(a), u = LN(z) and dv (the weight-gradient GEMMs' operands) in the weights' dtype: what the
    # GEMMs take (as torch's own autograd would, autocast's too), half the bytes of fp32 at 16 bits and no
    # conversion kernels; the forward's dot rounds act(a) the same way
    gdt = w_down.dtype
    hbuf = torch.empty((m, r), dtype=gdt, device=dev)
    dabuf = torch.empty((m, r), dtype=gdt, device=dev)
    dummy = x
    has_res = res is not None
    ln = pre_ln or post_ln
    lnw = ln_weight if ln_weight is not None else dummy
    lnb = ln_bias if ln_bias is not None else dummy
    flags = dict(HAS_RES=has_res, PRE_LN=pre_ln, POST_LN=post_ln, **_flags(x, w_down))
    sc = _scalar_args(x, scaling, eps)
    n_blocks = triton.cdiv(m, bm)
    # dv, the gradient reaching v = z + s*p through the post-LayerNorm: Houlsby's dres itself, else a scratch
    if post_ln:
        dv = dres if has_res and not pre_ln else torch.empty((m, d), dtype=gdt, device=dev)
    else:
        dv = dummy  # plain: dv = dy
    # seq_bn in one 16-bit dtype: the dW_down GEMM reads z itself, no u = LN(z) is written (`_param_grads_gemm`);
    # fp32 / fp64 keep u (there the product over z would cost more than torch's own rounding of u) and so does
    # autocast's mix (fp32 z, 16-bit GEMM operands)
    u_from_z = pre_ln and x.dtype == gdt and gdt in (torch.float16, torch.bfloat16)
    u = torch.empty((m, d), dtype=gdt, device=dev) if pre_ln and not u_from_z else dummy
    # per row block: column sums [s*dv (d) | LN weight (d) | LN bias (d) | da (r) | (u_from_z) q mean1 (r)],
    # reduced by one sum below
    pcol_w = 3 * d + (2 * r if u_from_z else r)
    a_scr = a_scratch(pre_ln)
    pcol = torch.empty((n_blocks, pcol_w), dtype=cdt, device=dev)
    _bwd_rows_kernel[(n_blocks,)](
        dy, x, res if has_res else dummy, w_down, b_down, w_up, b_up, lnw, lnb,
        _wd_ln(w_down, ln_weight, ln_bias, br, x) if pre_ln else dummy, dx,
        dres if has_res else dummy, hbuf, dabuf, torch.empty((m, r), dtype=cdt, device=dev) if a_scr else dummy,
        dv, u, pcol, m, d, r, pcol_w, *sc,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, ACT=ACT_IDS[activation], num_warps=warps,
        num_stages=_stages("bwd", x, res, dy), LN_GRADS=ln_param_grads, U_FROM_Z=u_from_z, A_SCRATCH=a_scr,
        **_maxnreg("bwd"), **flags)
    grads = _param_grads_gemm(dv if post_ln else dy, x, u if pre_ln and not u_from_z else None, hbuf, dabuf, pcol,
                              scaling, (ln_weight, ln_bias) if u_from_z else None)
    # the vectors are slices of one sum: each becomes a tensor of its own (outputs must not alias), in the cast
    # that rounds it to its parameter's dtype anyway
    dw_down, dw_up = grads[0].to(w_down.dtype), grads[2].to(w_up.dtype)
    db_down, db_up = grads[1].to(b_down.dtype, copy=True), grads[3].to(b_up.dtype, copy=True)
    dlnw = dlnb = None
    if ln and ln_param_grads:
        dlnw, dlnb = grads[4].to(ln_weight.dtype, copy=True), grads[5].to(ln_bias.dtype, copy=True)
    elif ln:  # frozen LayerNorm: nothing reduced, and nothing filled either (no kernel launch)
        dlnw, dlnb = torch.empty_like(ln_weight), torch.empty_like(ln_bias)
    return dx, dres, dw_down, db_down, dw_up, db_up, dlnw, dlnb


def _param_grads_gemm(dv, x, u, hbuf, dabuf, pcol, scaling: float, ln_from_z=None):
    """(dW_down, db_down, dW_up, db_up, dln_w, dln_b) from the row kernel's outputs: dv (M, d) the gradient
    reaching v (plain: dy; Houlsby: dres), u (M, d) = LN(z) (None: u = x), h / da (M, r) in hbuf / dabuf (the
    weights' dtype), pcol (blocks, 3d + r [+ r]) column sums [s*dv | LN weight | LN bias | da [| q mean1]] (the
    LayerNorm's are garbage when the kernel skipped them). dW_up = s (dvᵀ h), dW_down = daᵀ u: 16-bit GEMM
    operands as in torch's own bf16 autograd, fp32 accumulation and results (one rounding, to the parameters'
    dtype, by the caller); fp32 / fp64 exact. Block sums in a fixed order, all in one reduction.
    ln_from_z = (ln_weight, ln_bias): the kernel's U_FROM_Z, x is z and dabuf holds q = da rstd1 (Pfeiffer):
    dW_down = (qᵀ z - Σ q mean1) ∘ w + (Σ da) ⊗ b, the fp32 GEMM result and sum sharing q's rounding."""
    dw_up = mm_unrounded(dv.t(), hbuf)  # fp32 (fp64) results, rounded once to the parameters' dtype
    if scaling != 1.0:
        dw_up.mul_(scaling)
    dw_down = mm_unrounded(dabuf.t(), u if u is not None else x)
    d, r = dv.shape[1], hbuf.shape[1]
    sums = pcol.sum(0)
    if ln_from_z is not None:
        w, b = (t.to(dw_down.dtype) for t in ln_from_z)
        dw_down = torch.addr((dw_down - sums[3 * d + r:, None]) * w, sums[3 * d:3 * d + r], b)
    return dw_down, sums[3 * d:3 * d + r], dw_up, sums[:d], sums[d:2 * d], sums[2 * d:3 * d]
