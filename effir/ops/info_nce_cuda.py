"""InfoNCE backend "cuda": thin calls into the compiled extension (`effir._C`, ops `torch.ops.effir_C.*`).

Same two functions as every fused backend (contract: effir/ops/info_nce_chunked.py):
`forward(q, docs, temperature, query_groups, doc_groups, pos_offset, symmetric) -> (loss, lse, dloss_dt)`,
each (1 + symmetric, B) float32, and
`backward(q, docs, temperature, lse, grad_loss, query_groups, doc_groups, pos_offset) -> (dq, ddocs)`
in the inputs' dtypes. q (B, d) and docs (N, d): CUDA, fp32 / fp16 / bf16 (fp16/bf16 through the tensor
cores with fp32 accumulation, fp32 exact FFMA). Kernels: csrc/info_nce.cu; design: csrc/README.md.
"""
from __future__ import annotations

import torch

from effir.ops._cuda_ext import ops


def forward(q: torch.Tensor, docs: torch.Tensor, temperature: torch.Tensor, query_groups, doc_groups,
            pos_offset: int, symmetric: bool):
    """Row losses, log-sum-exps and d loss / d t per direction: three (R, B) float32 tensors."""
    return tuple(ops().info_nce_fwd(q, docs, _temp(temperature, q), query_groups, doc_groups, int(pos_offset),
                                    bool(symmetric)))


def backward(q: torch.Tensor, docs: torch.Tensor, temperature: torch.Tensor, lse: torch.Tensor,
             grad_loss: torch.Tensor, query_groups, doc_groups, pos_offset: int):
    """dq (B, d) and ddocs (N, d) in the inputs' dtypes, from the forward's lse (R, B) and dL/dloss (R, B)."""
    return tuple(ops().info_nce_bwd(q, docs, _temp(temperature, q), lse, grad_loss, query_groups, doc_groups,
                                    int(pos_offset)))


def _temp(temperature, q: torch.Tensor) -> torch.Tensor:
    # The kernels read the temperature on the device (no host sync); a Python float becomes a tensor.
    if not isinstance(temperature, torch.Tensor):
        return torch.full((), float(temperature), dtype=torch.float32, device=q.device)  # no H2D copy
    return temperature.to(device=q.device, dtype=torch.float32)
