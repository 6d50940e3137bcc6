"""Launchers for the Triton InfoNCE kernels (kernels/info_nce.py), in the backend contract of
effir/ops/info_nce.py: `forward(...) -> (loss, lse, dloss_dt)` (R, B) fp32 and `backward(...) -> (dq, ddocs)`.

Inputs fp32 / fp16 / bf16, contiguous. Extra memory: O((B + N) d) fp32 gradient workspaces, O(B) statistics,
and, in the backward, one dS block of at most (B + N) d entries in the input dtype.
"""
from __future__ import annotations


import torch
import triton

from effir.backends import triton_interpret
from kernels._knobs import env_choice
from kernels._mm import mm_unrounded

from kernels.info_nce import _bwd_dscores_kernel, _fwd_kernel, _mm_acc_kernel

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, docs):
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float32/float16/bfloat16 for backend 'triton', got {q.dtype}")
    for name, t in (("q", q), ("docs", docs)):
        if t.numel() >= 2**31:
            raise ValueError(f"{name} must hold fewer than 2**31 elements for backend 'triton' (int32 offsets), "
                             f"got shape {tuple(t.shape)}")


def _upcast(q) -> bool:
    """Work around the CPU interpreter's wrong bf16 tl.dot (see kernels/info_nce.py:_dot)."""
    return q.dtype == torch.bfloat16 and triton_interpret()


def _groups(query_groups, doc_groups, like):
    if query_groups is None:
        dummy = torch.zeros(1, dtype=torch.int64, device=like.device)
        return dummy, dummy, False
    return query_groups, doc_groups, True


def _fwd_one(q, docs, t, qg, dg, pos_offset, out_loss, out_lse, out_dldt):
    B, K = q.shape
    N = docs.shape[0]
    qg_, dg_, has = _groups(qg, dg, q)
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)  # noqa: E731
    _fwd_kernel[grid](q, docs, t, qg_, dg_, out_loss, out_lse, out_dldt, B, N, K, pos_offset, q.stride(0),
                      docs.stride(0), HAS_GROUPS=has, IEEE=q.dtype == torch.float32, UPCAST=_upcast(q))


def forward(q, docs, temperature, query_groups, doc_groups, pos_offset: int, symmetric: bool):
    _check(q, docs)
    B = q.shape[0]
    R = 2 if symmetric else 1
    t = temperature.to(torch.float32).contiguous()
    loss, lse, dldt = (torch.empty(R, B, dtype=torch.float32, device=q.device) for _ in range(3))
    _fwd_one(q, docs, t, query_groups, doc_groups, pos_offset, loss[0], lse[0], dldt[0])
    if symmetric:
        # positive i against the B queries: the same kernel with the roles of the groups swapped
        dg = None if doc_groups is None else doc_groups[:B].contiguous()
        _fwd_one(docs[:B], q, t, dg, query_groups, 0, loss[1], lse[1], dldt[1])
    return loss, lse, dldt


def ds_block_factor() -> int:
    """EFFIR_TRITON_DS_BLOCK (default 2): a dS block holds at most this many times (B + N) d entries."""
    return int(env_choice("EFFIR_TRITON_DS_BLOCK", ("1", "2"), "2"))


def block_shape(B: int, N: int, d: int, factor: int | None = None) -> tuple[int, int]:
    """(rows, cols) of one dS block of the blocked backward: at most factor (B + N) d entries (the memory stays
    O((B + N) d), like q and docs themselves), at most 8192 x 8192, halved along the longer side until it fits,
    and never the whole (B, N) matrix unless that has at most 2**16 entries. Large blocks keep the three
    launches per block few (each launch costs ~10-30 us of host time) and, with factor 2, square: at
    B = N = 32768, d = 768 factor 1 gives 8192 x 4096 blocks, whose ddocs GEMM (4096 output rows) fills only
    1.45 waves of 256 x 64 tiles on 132 SMs (the first H100 run: backward at 45% of the matmul rate); 8192 x 8192
    gives both GEMMs 8192 rows (2.9 waves) for 128 MiB of bf16 dS (1.3x the inputs)."""
    factor = ds_block_factor() if factor is None else factor
    budget = max(factor * (B + N) * d, 1 << 16)
    rows, cols = min(B, 8192), min(N, 8192)
    while (rows * cols > budget or (rows == B and cols == N and B * N > (1 << 16))) and max(rows, cols) > 1:
        if cols >= rows:
            cols = (cols + 1) // 2
        else:
            rows = (rows + 1) // 2
    return rows, cols


def gemm_order() -> str:
    """EFFIR_TRITON_GEMM_ORDER: "row" (default: tiles along N first, each dS row panel read from HBM about
    once) or "column" (along M first, the order before 2026-11-27; kept to time both side by side)."""
    return env_choice("EFFIR_TRITON_GEMM_ORDER", ("row", "column"), "row")


def _backward_blocked(q, docs, t, lse, g, qg_, dg_, has, sym, pos_offset):
    """(dq (B, d), ddocs (N, d)) in the input dtype: per dS block one dS kernel and two GEMM steps that
    accumulate in fp32 buffers (the first step writes, the last one writes the gradient itself)."""
    B, K = q.shape
    N = docs.shape[0]
    ieee, up = q.dtype == torch.float32, _upcast(q)
    rows, cols = block_shape(B, N, K)
    n_rb, n_cb = triton.cdiv(B, rows), triton.cdiv(N, cols)
    f32 = dict(dtype=torch.float32, device=q.device)
    # fp32 running sums only where some output block takes more than one step; fp32 inputs sum in place
    dq = torch.empty(B, K, dtype=q.dtype, device=q.device)
    dd = torch.empty(N, K, dtype=docs.dtype, device=q.device)
    acc_q = dq if ieee or n_cb == 1 else torch.empty(B, K, **f32)
    acc_d = dd if ieee or n_rb == 1 else torch.empty(N, K, **f32)
    n_fastest, cublas = gemm_order() == "row", gemm_engine() == "cublas"
    ds = torch.empty(rows, cols, dtype=q.dtype, device=q.device)
    for ri, r0 in enumerate(range(0, B, rows)):
        nr = min(rows, B - r0)
        for ci, c0 in enumerate(range(0, N, cols)):
            nc = min(cols, N - c0)
            _bwd_dscores_kernel[lambda m: (triton.cdiv(nr, m["BLOCK_M"]), triton.cdiv(nc, m["BLOCK_N"]))](
                q, docs, t, qg_, dg_, lse, g, ds, B, N, K, r0, c0, nr, nc, pos_offset, q.stride(0),
                docs.stride(0), ds.stride(0), HAS_GROUPS=has, SYMMETRIC=sym, IEEE=ieee, UPCAST=up)
            blk = ds[:nr, :nc]
            rs, cs = slice(r0, r0 + nr), slice(c0, c0 + nc)
            # dq[rows] += dS . docs[cols] ;  dd[cols] += dSᵀ . q[rows]
            _mm_acc(blk, docs[cs], acc_q[rs], dq[rs], ci == 0, ci == n_cb - 1, n_fastest, cublas, ieee, up)
            _mm_acc(blk.t(), q[rs], acc_d[cs], dd[cs], ri == 0, ri == n_rb - 1, n_fastest, cublas, ieee, up)
    return dq, dd


def gemm_engine() -> str:
    """EFFIR_TRITON_LOSS_GEMM: "cublas" (default: torch.mm with an fp32 output for 16-bit inputs, the same fp32
    accumulation) or "triton" (`_mm_acc_kernel`, which folds the running sum into its epilogue). Third H100 run
    (bench/results/gpu_h100_2026-11-27_run3, B = N = 32768, d = 768, bf16, side by side): a whole loss step
    14.41 ms with cuBLAS steps against 15.83 ms with the Triton ones, for 24 MiB more peak memory (the fp32
    product of one dS block before it is added)."""
    return env_choice("EFFIR_TRITON_LOSS_GEMM", ("triton", "cublas"), "cublas")


def _mm_acc(a, b, c, out, first: bool, last: bool, n_fastest: bool, cublas: bool, ieee: bool, up: bool):
    """One step of out (M, N) = sum of a (M, K) @ b (K, N), running sum in c (fp32, row-major, same strides as
    out): first -> c = a @ b (c not read); last -> out = c + a @ b; else c += a @ b. cublas: torch.mm steps."""
    M, Kr = a.shape
    N = b.shape[1]
    if cublas:
        if first and last:
            out.copy_(mm_unrounded(a, b))
        elif first:
            c.copy_(mm_unrounded(a, b))
        else:
            c.add_(mm_unrounded(a, b))
            if last and out.data_ptr() != c.data_ptr():
                out.copy_(c)
        return
    _mm_acc_kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)](
        a, b, c, out, M, N, Kr, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        FIRST=first, LAST=last, N_FASTEST=n_fastest, IEEE=ieee, UPCAST=up)


def backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset: int):
    _check(q, docs)
    t = temperature.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    g = grad_loss.to(torch.float32).contiguous()
    sym = lse.shape[0] == 2
    qg_, dg_, has = _groups(query_groups, doc_groups, q)
    return _backward_blocked(q, docs, t, lse, g, qg_, dg_, has, sym, pos_offset)
