"""In-batch contrastive loss (InfoNCE) for dual encoders, fused and memory-lean.

`info_nce(q, p, negatives=None, *, temperature=0.05, symmetric=False, query_groups=None, doc_groups=None,
reduction="mean", backend="auto", gather=False, process_group=None)`

- q (B, d) queries, p (B, d) positives aligned by row, negatives (M, d) optional extra passages every query
  competes against. Scores are raw dot products s = q . [p; negatives]^T (normalise first for cosine).
  Row i: loss_i = logsumexp_j(s_ij / t) - s_ii / t over the N = B + M columns.
- symmetric=True adds the passage->query direction (positive i against the B queries, target i); the result
  averages the two directions (per pair for reduction="none").
- query_groups (B,) / doc_groups (B + M,) integer ids: column j != i leaves row i's log-sum-exp when
  doc_groups[j] == query_groups[i] (a translation of the positive is not a negative); symmetric direction:
  query j != i leaves positive i's row when query_groups[j] == doc_groups[i].
- reduction: "mean" (scalar), "sum" (scalar), "none" ((B,)).
- Inputs fp32 / fp16 / bf16 (fp64 for "reference" and "chunked"), same dtype and device; accumulation in
  fp32; the loss is returned in **float32** (float64 for float64 inputs) whatever the input dtype.
- Gradients flow to q, p, negatives and temperature (a float, or a 0-dim tensor that may require grad).
- backend: "auto" | "reference" | "chunked" | "triton" | "cuda" (see effir.backends).
- gather=True / process_group: every rank sees all ranks' positives and negatives (effir.distributed).
- Bad input raises ValueError naming the argument.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from effir.ops.info_nce import info_nce

__all__ = ["info_nce", "InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """nn.Module around `info_nce`; `learnable_temperature=True` trains log(t) (an nn.Parameter).

    forward(q, p, negatives=None, query_groups=None, doc_groups=None) -> scalar float32 loss
    (or (B,) with reduction="none"). Shapes and dtypes as in `info_nce`.
    """

    def __init__(self, temperature: float = 0.05, learnable_temperature: bool = False, symmetric: bool = False,
                 reduction: str = "mean", backend: str = "auto", gather: bool = False, process_group=None):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                0 < float(temperature) < math.inf):
            raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
        self.learnable_temperature = bool(learnable_temperature)
        log_t = torch.tensor(math.log(float(temperature)), dtype=torch.float32)
        if self.learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
            self._fixed_temperature = float(temperature)
        self.symmetric = symmetric
        self.reduction = reduction
        self.backend = backend
        self.gather = gather
        self.process_group = process_group

    @property
    def temperature(self):
        """Current temperature: a float when fixed, a 0-dim tensor (with grad) when learnable."""
        return self.log_temperature.exp() if self.learnable_temperature else self._fixed_temperature

    def forward(self, q, p, negatives=None, query_groups=None, doc_groups=None):
        return info_nce(q, p, negatives, temperature=self.temperature, symmetric=self.symmetric,
                        query_groups=query_groups, doc_groups=doc_groups, reduction=self.reduction,
                        backend=self.backend, gather=self.gather, process_group=self.process_group)

    def get_config_dict(self) -> dict:
        t = self.temperature
        return {
            "temperature": float(t.detach()) if isinstance(t, torch.Tensor) else t,
            "learnable_temperature": self.learnable_temperature,
            "symmetric": self.symmetric,
            "reduction": self.reduction,
            "backend": self.backend,
            "gather": self.gather,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items())
