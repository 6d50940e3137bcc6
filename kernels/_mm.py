"""Host-side matrix product shared by the launchers: the product of two operands with the accumulator's
precision kept in the result."""
from __future__ import annotations

import torch


def mm_unrounded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D) returned in fp32 for 16-bit and fp32 operands (16-bit products are never rounded on the way:
    cuBLAS with an fp32 output on a GPU; on CPU bf16 x bf16 products are exact in fp32), in fp64 for fp64."""
    if a.dtype == torch.float64:
        return torch.mm(a, b)
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b, out_dtype=torch.float32)
