"""FLOPs of a dual-encoder train step: what torch's FlopCounterMode counts, and the analytic count.

FlopCounterMode counts matmul-class aten ops only. Two gaps are filled here, with the same matmul rule
(2·m·n·k per product):
- effir's fused ops are opaque `effir::` custom ops, so they get formulas from their math
  (adapter forward 4·M·d·r; its backward recomputes the r-wide intermediate: 4·M·d·r + 8·M·d·r;
  InfoNCE forward 2·B·N·d; backward recomputes S: 2·B·N·d + 4·B·N·d);
- CPU scaled-dot-product attention (`_scaled_dot_product_flash_attention_for_cpu` and its backward) has no
  formula in torch; it gets torch's own sdpa formulas.
The analytic count (`analytic_step_flops`) is derived from the model's dimensions and the padded batch
shapes alone, independently of what ran, and the benchmark checks the counter against it.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten
_REGISTERED = False


def _adapter_fwd_flops(x_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    m, d = x_shape[0], x_shape[-1]
    r = w_down_shape[0]
    return 4 * m * d * r


def _adapter_bwd_flops(dy_shape, x_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    m, d = x_shape[0], x_shape[-1]
    r = w_down_shape[0]
    return 12 * m * d * r  # recompute (4) + d(up) dW, dX + d(down) dW, dX (8)


def _adapter_ln_fwd_flops(x_shape, res_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    return _adapter_fwd_flops(x_shape, w_down_shape)


def _adapter_ln_bwd_flops(dy_shape, x_shape, res_shape, w_down_shape, *args, out_shape=None, **kwargs) -> int:
    return _adapter_bwd_flops(dy_shape, x_shape, w_down_shape)


def _info_nce_fwd_flops(q_shape, docs_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * q_shape[0] * docs_shape[0] * q_shape[1]


def _info_nce_bwd_flops(q_shape, docs_shape, *args, out_shape=None, **kwargs) -> int:
    return 6 * q_shape[0] * docs_shape[0] * q_shape[1]


def register_effir_flop_formulas() -> None:
    """Idempotent: formulas for effir's custom ops and CPU sdpa (only where torch has none)."""
    global _REGISTERED
    if _REGISTERED:
        return
    targets = []
    try:
        import effir.ops.bottleneck_adapter  # noqa: F401  (defines the effir:: adapter ops)
        import effir.ops.info_nce  # noqa: F401

        ops = torch.ops.effir
        targets += [
            (ops.bottleneck_adapter_fwd, _adapter_fwd_flops),
            (ops.bottleneck_adapter_bwd, _adapter_bwd_flops),
            (ops.bottleneck_adapter_ln_fwd, _adapter_ln_fwd_flops),
            (ops.bottleneck_adapter_ln_bwd, _adapter_ln_bwd_flops),
            (ops.info_nce_fwd, _info_nce_fwd_flops),
            (ops.info_nce_bwd, _info_nce_bwd_flops),
        ]
    except (ImportError, AttributeError):  # the peers env may run without effir's ops
        pass
    cpu_fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    cpu_bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if cpu_fwd is not None:
        targets.append((cpu_fwd, fc.sdpa_flop))
    if cpu_bwd is not None:
        targets.append((cpu_bwd, fc.sdpa_backward_flop))
    for op, fn in targets:
        packet = op if isinstance(op, torch._ops.OpOverloadPacket) else None
        keys = [op] if packet is None else [getattr(op, o) for o in op.overloads()]
        if any(k in fc.flop_registry for k in keys):
            continue
        # torch's own sdpa formulas are already shape-wrapped: register them raw
        fc.register_flop_formula(op, get_raw=fn in (fc.sdpa_flop, fc.sdpa_backward_flop))(fn)
    _REGISTERED = True


def analytic_step_flops(*, layers: int, hidden: int, intermediate: int, inputs: list[tuple[int, int]],
                        reduction: int | None, adapter_impl: str, loss_impl: str, loss_rows: int,
                        loss_cols: int, attention: str = "math", pooler: bool = False,
                        unpadded: bool = False) -> dict:
    """Matmul FLOPs of one train step of a post-LN BERT dual encoder with frozen backbone + seq_bn adapters.

    inputs: (batch, padded tokens[, real tokens]) of each encoder call (queries, passages). unpadded: the
    encoder runs its position-wise layers on the real tokens only (effir's `Encoder(unpad=True)`), attention on
    the padded grid; otherwise every matmul sees batch x padded tokens. reduction: adapter bottleneck
    r = hidden // reduction (None: full fine-tuning, every weight trains). adapter_impl: "fused" (effir:
    backward recomputes the adapter and returns every gradient) or "autograd" (AdapterHub: autograd skips
    the input gradient of the first layer's adapter, which nothing upstream needs). loss_impl: "fused"
    (backward recomputes S) or "autograd". attention: "math" (CPU with a padding mask: torch decomposes sdpa
    into bmm; backward = dP, dV, dQ, dK = 2x forward) or "fused" (a fused sdpa kernel; torch's formula also
    counts the recomputed scores: 2.5x forward). pooler: the model runs BERT's pooler (a dense layer on the
    first token, 2·b·H² per call, output unused so no backward) -- sentence-transformers loads one. Backward through a frozen linear costs one matmul (dX), through
    a trained one two (dX, dW); layer 1 needs no dX unless its own weights train (full fine-tuning still
    computes layer 1's dX, since the embedding LayerNorm trains; an embedding lookup has no matmul).
    """
    H, F, L = hidden, intermediate, layers
    full = reduction is None
    r = 0 if full else hidden // int(reduction)
    out = {"encoder_forward": 0, "encoder_backward": 0, "adapter_forward": 0, "adapter_backward": 0,
           "loss_forward": 0, "loss_backward": 0}
    for item in inputs:
        b, t = item[:2]
        M = item[2] if unpadded and len(item) > 2 else b * t
        lin = 8 * M * H * H + 4 * M * H * F  # QKV + O + FFN up + down
        att = 4 * b * t * t * H  # Q·Kᵀ and P·V over all heads
        att_bwd = (10 if attention == "fused" else 8) * b * t * t * H
        out["encoder_forward"] += L * (lin + att) + (2 * b * H * H if pooler else 0)
        if full:
            # every layer: dX and dW of every linear
            out["encoder_backward"] += L * (2 * lin + att_bwd)
        else:
            # layers 2..L sit between trained adapters: dX through everything; layer 1 only its adapter.
            out["encoder_backward"] += (L - 1) * (lin + att_bwd)
            a_fwd = 4 * M * H * r
            out["adapter_forward"] += L * a_fwd
            if adapter_impl == "fused":
                out["adapter_backward"] += L * 3 * a_fwd
            else:
                out["adapter_backward"] += (L - 1) * 2 * a_fwd + (3 * a_fwd) // 2
    s = 2 * loss_rows * loss_cols * H
    out["loss_forward"] = s
    out["loss_backward"] = 3 * s if loss_impl == "fused" else 2 * s
    out["total"] = sum(out.values())
    return out
