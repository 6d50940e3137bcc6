"""The card's two measured ceilings, taken in the same run as the kernels they judge.

- copy: a large device-to-device copy, bytes read + bytes written per second (the memory-bound roof);
- matmul: an 8192^3 bf16 matrix product through torch (cuBLAS), FLOP/s (the matrix-bound roof).
Inputs are random (never zeros: zeros ran a matmul 13% faster on these machines), timed with CUDA events
after warm-up, median of repeats.
"""
from __future__ import annotations


import torch

from bench.gpu._timing import median_ms




def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> dict:
    """Device-to-device copy of `nbytes` (far above L2): (read + written) bytes / s."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, reps=reps)
    del src, dst
    return {"bytes": nbytes, "median_ms": ms, "bytes_per_s": 2 * nbytes / (ms * 1e-3)}


def matmul_rate(n: int = 8192, reps: int = 20) -> dict:
    """bf16 n x n x n product: 2 n^3 FLOP / s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b, out=c), warmup=5, reps=reps)
    del a, b, c
    return {"n": n, "median_ms": ms, "flop_per_s": 2 * n**3 / (ms * 1e-3)}


def run(out=None, quick: bool = False) -> dict:
    res = {"copy": copy_bandwidth(1 << 30 if quick else 2 << 30, reps=10 if quick else 20),
           "matmul_bf16": matmul_rate(8192, reps=10 if quick else 20)}
    torch.cuda.empty_cache()
    return res
