"""Triton kernels of the fused bottleneck adapter (plain, and followed by residual + LayerNorm).

One kernel family covers three variants through constexpr flags (z = x + res when HAS_RES):
  plain              y = x + s*f(x)                                  (HAS_RES=0, PRE_LN=0, POST_LN=0)
  Houlsby / parallel y = LN(x + s*f(x) + res)                        (HAS_RES=1, PRE_LN=0, POST_LN=1)
  Pfeiffer (seq_bn)  y = LN(z + s*f(LN(z)))                          (HAS_RES=1, PRE_LN=1, POST_LN=1)
with f(u) = act(u @ Wdᵀ + bd) @ Wuᵀ + bu and one LayerNorm (weight, bias) used for both LNs.

Forward: one program per BLOCK_M rows holds the full rows in registers, reads x (and res) once, keeps
the r-wide intermediate on chip, writes y once.
Backward, no atomics, deterministic:
  1. `_bwd_rows_kernel` (one program per BLOCK_M rows) recomputes the forward, writes dx (and dres),
     the r-wide act(a) and d(a) rows and six per-row LayerNorm scalars.
  2. `_bwd_params_kernel` (grid: d-chunks x row splits) accumulates the parameter gradients of its
     d-chunk over its row range in fp32 registers and writes one partial per split; the launcher sums
     the partials over splits in a fixed order.
Thin launchers only; autograd lives in effir/ops.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ACT_IDS = {"relu": 0, "gelu": 1, "silu": 2}
_N_STATS = 6  # mean1, rstd1, mean2, rstd2, c1 = mean(g), c2 = mean(g * vhat)  with g = dy * ln_weight


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
def _ln_stats(v, cmask, D, eps):
    # masked row statistics over the first D columns (padding columns hold zeros)
    mean = tl.sum(v, axis=1) / D
    diff = tl.where(cmask[None, :], v - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, diff * rstd[:, None]


@triton.jit
def _fwd_kernel(X, RES, WD, BD, WU, BU, LNW, LNB, Y, M, D, R, scaling, eps,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr,
                HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    rmask = rows < M
    cmask = cols < D
    qmask = rr < R
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(CDT)
    z = x
    if HAS_RES:
        z = z + tl.load(RES + offs, mask=mask, other=0.0).to(x.dtype)
    if PRE_LN or POST_LN:
        lnw = tl.load(LNW + cols, mask=cmask, other=0.0).to(x.dtype)
        lnb = tl.load(LNB + cols, mask=cmask, other=0.0).to(x.dtype)
    if PRE_LN:
        _m1, _r1, uhat = _ln_stats(z, cmask, D, eps)
        u = uhat * lnw[None, :] + lnb[None, :]
    else:
        u = x
    # Wdᵀ tile (BLOCK_D, BLOCK_R) from w_down (R, D) row-major; padding is zero so it adds nothing
    wdt = tl.load(WD + rr[None, :] * D + cols[:, None], mask=qmask[None, :] & cmask[:, None], other=0.0)
    bd = tl.load(BD + rr, mask=qmask, other=0.0).to(x.dtype)
    a = _mm(u.to(wdt.dtype), wdt, IEEE).to(x.dtype) + bd[None, :]
    h = _act(a, ACT)
    # Wuᵀ tile (BLOCK_R, BLOCK_D) from w_up (D, R) row-major
    wut = tl.load(WU + cols[None, :] * R + rr[:, None], mask=cmask[None, :] & qmask[:, None], other=0.0)
    bu = tl.load(BU + cols, mask=cmask, other=0.0).to(x.dtype)
    p = _mm(h.to(wut.dtype), wut, IEEE).to(x.dtype) + bu[None, :]
    v = z + scaling * p
    if POST_LN:
        _m2, _r2, vhat = _ln_stats(tl.where(cmask[None, :], v, 0.0), cmask, D, eps)
        v = vhat * lnw[None, :] + lnb[None, :]
    tl.store(Y + offs, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows_kernel(DY, X, RES, WD, BD, WU, BU, LNW, LNB, DX, DRES, HBUF, DABUF, STATS, M, D, R, scaling, eps,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr,
                     HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rr = tl.arange(0, BLOCK_R)
    rmask = rows < M
    cmask = cols < D
    qmask = rr < R
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(CDT)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(x.dtype)
    z = x
    if HAS_RES:
        z = z + tl.load(RES + offs, mask=mask, other=0.0).to(x.dtype)
    if PRE_LN or POST_LN:
        lnw = tl.load(LNW + cols, mask=cmask, other=0.0).to(x.dtype)
        lnb = tl.load(LNB + cols, mask=cmask, other=0.0).to(x.dtype)
    # recompute the forward (nothing but the inputs was saved)
    if PRE_LN:
        mean1, rstd1, uhat = _ln_stats(z, cmask, D, eps)
        u = uhat * lnw[None, :] + lnb[None, :]
    else:
        u = x
    wdt = tl.load(WD + rr[None, :] * D + cols[:, None], mask=qmask[None, :] & cmask[:, None], other=0.0)
    bd = tl.load(BD + rr, mask=qmask, other=0.0).to(x.dtype)
    a = _mm(u.to(wdt.dtype), wdt, IEEE).to(x.dtype) + bd[None, :]
    h = _act(a, ACT)
    if POST_LN:
        wut = tl.load(WU + cols[None, :] * R + rr[:, None], mask=cmask[None, :] & qmask[:, None], other=0.0)
        bu = tl.load(BU + cols, mask=cmask, other=0.0).to(x.dtype)
        p = _mm(h.to(wut.dtype), wut, IEEE).to(x.dtype) + bu[None, :]
        v = tl.where(cmask[None, :], z + scaling * p, 0.0)
        mean2, rstd2, vhat = _ln_stats(v, cmask, D, eps)
        g = dy * lnw[None, :]
        c1 = tl.sum(g, axis=1) / D
        c2 = tl.sum(g * vhat, axis=1) / D
        dv = tl.where(cmask[None, :], (g - c1[:, None] - vhat * c2[:, None]) * rstd2[:, None], 0.0)
    else:
        dv = dy
    dp = scaling * dv
    # dh = dp @ Wu ; Wu tile (BLOCK_D, BLOCK_R)
    wu = tl.load(WU + cols[:, None] * R + rr[None, :], mask=cmask[:, None] & qmask[None, :], other=0.0)
    dh = _mm(dp.to(wu.dtype), wu, IEEE).to(x.dtype)
    da = dh * _act_grad(a, ACT)
    # du = da @ Wd ; Wd tile (BLOCK_R, BLOCK_D)
    wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=qmask[:, None] & cmask[None, :], other=0.0)
    du = _mm(da.to(wd.dtype), wd, IEEE).to(x.dtype)
    if PRE_LN:
        g1 = du * lnw[None, :]
        e1 = tl.sum(g1, axis=1) / D
        e2 = tl.sum(g1 * uhat, axis=1) / D
        dz = dv + tl.where(cmask[None, :], (g1 - e1[:, None] - uhat * e2[:, None]) * rstd1[:, None], 0.0)
        dx = dz
        dres = dz
    else:
        dx = dv + du
        dres = dv
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(DRES + offs, dres.to(DRES.dtype.element_ty), mask=mask)
    roffs = rows[:, None].to(tl.int64) * R + rr[None, :]
    rqmask = rmask[:, None] & qmask[None, :]
    tl.store(HBUF + roffs, h, mask=rqmask)
    tl.store(DABUF + roffs, da, mask=rqmask)
    if PRE_LN:
        tl.store(STATS + rows * 6 + 0, mean1, mask=rmask)
        tl.store(STATS + rows * 6 + 1, rstd1, mask=rmask)
    if POST_LN:
        tl.store(STATS + rows * 6 + 2, mean2, mask=rmask)
        tl.store(STATS + rows * 6 + 3, rstd2, mask=rmask)
        tl.store(STATS + rows * 6 + 4, c1, mask=rmask)
        tl.store(STATS + rows * 6 + 5, c2, mask=rmask)


@triton.jit
def _bwd_params_kernel(DY, X, RES, WD, WU, BU, LNW, LNB, HBUF, DABUF, STATS,
                       PWD, PBD, PWU, PBU, PLNW, PLNB, M, D, R, rows_per_split, scaling,
                       BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_R: tl.constexpr,
                       HAS_RES: tl.constexpr, PRE_LN: tl.constexpr, POST_LN: tl.constexpr, IEEE: tl.constexpr, CDT: tl.constexpr):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
    rr = tl.arange(0, BLOCK_R)
    cmask = cols < D
    qmask = rr < R
    xdt = X.dtype.element_ty
    cdt = CDT  # fp32, or fp64 for fp64 inputs
    if PRE_LN or POST_LN:
        lnw = tl.load(LNW + cols, mask=cmask, other=0.0).to(cdt)
        lnb = tl.load(LNB + cols, mask=cmask, other=0.0).to(cdt)
    if POST_LN:
        wut = tl.load(WU + cols[None, :] * R + rr[:, None], mask=cmask[None, :] & qmask[:, None], other=0.0)
        bu = tl.load(BU + cols, mask=cmask, other=0.0).to(cdt)
    if PRE_LN:
        wd = tl.load(WD + rr[:, None] * D + cols[None, :], mask=qmask[:, None] & cmask[None, :], other=0.0)
    acc_wu = tl.zeros((BLOCK_DC, BLOCK_R), dtype=cdt)
    acc_wd = tl.zeros((BLOCK_R, BLOCK_DC), dtype=cdt)
    acc_bu = tl.zeros((BLOCK_DC,), dtype=cdt)
    acc_bd = tl.zeros((BLOCK_R,), dtype=cdt)
    acc_lw = tl.zeros((BLOCK_DC,), dtype=cdt)
    acc_lb = tl.zeros((BLOCK_DC,), dtype=cdt)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        roffs = rows[:, None].to(tl.int64) * R + rr[None, :]
        rqmask = rmask[:, None] & qmask[None, :]
        h = tl.load(HBUF + roffs, mask=rqmask, other=0.0)
        da = tl.load(DABUF + roffs, mask=rqmask, other=0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(cdt)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(cdt)
        z = x
        if HAS_RES:
            z = z + tl.load(RES + offs, mask=mask, other=0.0).to(cdt)
        if PRE_LN:
            mean1 = tl.load(STATS + rows * 6 + 0, mask=rmask, other=0.0)
            rstd1 = tl.load(STATS + rows * 6 + 1, mask=rmask, other=0.0)
            uhat = tl.where(mask, (z - mean1[:, None]) * rstd1[:, None], 0.0)
            u = uhat * lnw[None, :] + lnb[None, :]
        else:
            u = x
        if POST_LN:
            mean2 = tl.load(STATS + rows * 6 + 2, mask=rmask, other=0.0)
            rstd2 = tl.load(STATS + rows * 6 + 3, mask=rmask, other=0.0)
            c1 = tl.load(STATS + rows * 6 + 4, mask=rmask, other=0.0)
            c2 = tl.load(STATS + rows * 6 + 5, mask=rmask, other=0.0)
            p = _mm(h.to(wut.dtype), wut, IEEE).to(cdt) + bu[None, :]
            vhat = tl.where(mask, (z + scaling * p - mean2[:, None]) * rstd2[:, None], 0.0)
            acc_lw += tl.sum(dy * vhat, axis=0)
            acc_lb += tl.sum(dy, axis=0)
            dv = tl.where(mask, (dy * lnw[None, :] - c1[:, None] - vhat * c2[:, None]) * rstd2[:, None], 0.0)
        else:
            dv = dy
        dp = scaling * dv
        acc_bu += tl.sum(dp, axis=0)
        acc_bd += tl.sum(da, axis=0)
        # dWu[d, r] += Σ_m dp[m, d] h[m, r] ;  dWd[r, d] += Σ_m da[m, r] u[m, d]
        acc_wu += _mm(tl.trans(dp.to(xdt)), h.to(xdt), IEEE).to(cdt)
        acc_wd += _mm(tl.trans(da.to(xdt)), u.to(xdt), IEEE).to(cdt)
        if PRE_LN:
            du = _mm(da.to(wd.dtype), wd, IEEE).to(cdt)
            acc_lw += tl.sum(du * uhat, axis=0)
            acc_lb += tl.sum(du, axis=0)
    base = pid_s.to(tl.int64) * D * R
    tl.store(PWU + base + cols[:, None] * R + rr[None, :], acc_wu, mask=cmask[:, None] & qmask[None, :])
    tl.store(PWD + base + rr[:, None] * D + cols[None, :], acc_wd, mask=qmask[:, None] & cmask[None, :])
    tl.store(PBU + pid_s * D + cols, acc_bu, mask=cmask)
    if PRE_LN or POST_LN:
        tl.store(PLNW + pid_s * D + cols, acc_lw, mask=cmask)
        tl.store(PLNB + pid_s * D + cols, acc_lb, mask=cmask)
    if pid_d == 0:
        tl.store(PBD + pid_s * R + rr, acc_bd, mask=qmask)


def _blocks(d: int, r: int, dtype: torch.dtype):
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(16, triton.next_power_of_2(r))
    # full rows live in registers: keep BLOCK_M * BLOCK_D around 8K elements (fp64: half)
    budget = 4096 if dtype == torch.float64 else 8192
    block_m = max(16, min(64, budget // block_d))
    return block_m, block_d, block_r


def _flags(x: torch.Tensor):
    # compute dtype of all elementwise math and accumulators: fp32, or fp64 for fp64 inputs
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return dict(IEEE=interp or x.dtype in (torch.float32, torch.float64),
                CDT=tl.float64 if x.dtype == torch.float64 else tl.float32)


def fused_adapter_fwd(x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str, scaling: float,
                      eps: float, pre_ln: bool, post_ln: bool) -> torch.Tensor:
    """y (M, d) of one variant (see module doc). x, res: (M, d) contiguous; res/ln_* may be None."""
    m, d = x.shape
    r = w_down.shape[0]
    y = torch.empty_like(x)
    bm, bd, br = _blocks(d, r, x.dtype)
    dummy = x  # never read when the flag is off
    _fwd_kernel[(triton.cdiv(m, bm),)](
        x, res if res is not None else dummy, w_down, b_down, w_up, b_up,
        ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy, y,
        m, d, r, float(scaling), float(eps), BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, ACT=ACT_IDS[activation],
        HAS_RES=res is not None, PRE_LN=pre_ln, POST_LN=post_ln, num_warps=4 if bd <= 256 else 8, **_flags(x))
    return y


def _n_splits(m: int, block_m: int, n_dchunks: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the interpreter: few programs, same code path
    return max(1, min(triton.cdiv(m, block_m), triton.cdiv(target, n_dchunks)))


def fused_adapter_bwd(dy, x, res, w_down, b_down, w_up, b_up, ln_weight, ln_bias, activation: str,
                      scaling: float, eps: float, pre_ln: bool, post_ln: bool):
    """(dx, dres|None, dw_down, db_down, dw_up, db_up, dln_weight|None, dln_bias|None); all inputs contiguous."""
    m, d = x.shape
    r = w_down.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    bm, bd, br = _blocks(d, r, x.dtype)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if res is not None else None
    hbuf = torch.empty((m, r), dtype=cdt, device=dev)
    dabuf = torch.empty((m, r), dtype=cdt, device=dev)
    stats = torch.empty((m, _N_STATS) if (pre_ln or post_ln) else (1, _N_STATS), dtype=cdt, device=dev)
    dummy = x
    has_res = res is not None
    lnw = ln_weight if ln_weight is not None else dummy
    lnb = ln_bias if ln_bias is not None else dummy
    flags = dict(HAS_RES=has_res, PRE_LN=pre_ln, POST_LN=post_ln, **_flags(x))
    _bwd_rows_kernel[(triton.cdiv(m, bm),)](
        dy, x, res if has_res else dummy, w_down, b_down, w_up, b_up, lnw, lnb, dx,
        dres if has_res else dummy, hbuf, dabuf, stats, m, d, r, float(scaling), float(eps),
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, ACT=ACT_IDS[activation], num_warps=4 if bd <= 256 else 8, **flags)
    block_dc = min(64, bd)
    block_m2 = 64 if x.dtype != torch.float64 else 32
    n_dc = triton.cdiv(d, block_dc)
    splits = _n_splits(m, block_m2, n_dc, dev)
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m2) * block_m2
    splits = triton.cdiv(m, rows_per_split)
    pwd = torch.empty((splits, r, d), dtype=cdt, device=dev)
    pwu = torch.empty((splits, d, r), dtype=cdt, device=dev)
    pbu = torch.empty((splits, d), dtype=cdt, device=dev)
    pbd = torch.empty((splits, r), dtype=cdt, device=dev)
    ln = pre_ln or post_ln
    plnw = torch.empty((splits, d), dtype=cdt, device=dev) if ln else pbu
    plnb = torch.empty((splits, d), dtype=cdt, device=dev) if ln else pbu
    _bwd_params_kernel[(n_dc, splits)](
        dy, x, res if has_res else dummy, w_down, w_up, b_up, lnw, lnb, hbuf, dabuf, stats,
        pwd, pbd, pwu, pbu, plnw, plnb, m, d, r, rows_per_split, float(scaling),
        BLOCK_M=block_m2, BLOCK_DC=block_dc, BLOCK_R=br, num_warps=4, **flags)
    # fixed-order sums over the splits: deterministic
    dw_down = pwd.sum(0).to(w_down.dtype)
    db_down = pbd.sum(0).to(b_down.dtype)
    dw_up = pwu.sum(0).to(w_up.dtype)
    db_up = pbu.sum(0).to(b_up.dtype)
    dlnw = plnw.sum(0).to(ln_weight.dtype) if ln else None
    dlnb = plnb.sum(0).to(ln_bias.dtype) if ln else None
    return dx, dres, dw_down, db_down, dw_up, db_up, dlnw, dlnb
