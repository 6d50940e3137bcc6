"""`BottleneckAdapter`: the nn.Module around the fused ops (identity at initialisation)."""
from __future__ import annotations

import math

import torch
from torch import nn

from effir.ops.bottleneck_adapter import bottleneck_adapter, bottleneck_adapter_layernorm
from effir.reference.bottleneck_adapter import canonical_activation


class BottleneckAdapter(nn.Module):
    """d -> r -> d bottleneck with residual: y = x + scaling * up(act(down(x))), r = hidden_size // reduction_factor.

    Parameters: `down` (nn.Linear d->r), `up` (nn.Linear r->d, zero at init so a new adapter is the identity).
    Inputs (..., hidden_size) of any float dtype: under autocast the weights are cast to the input dtype.
    backend: "auto" | "reference" | "recompute" | "triton" | "cuda" (see effir.backends).
    """

    def __init__(self, hidden_size: int, reduction_factor: float = 16, activation: str = "relu",
                 scaling: float = 1.0, backend: str = "auto", init_weights: str = "bert",
                 bottleneck_size: int | None = None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        r = bottleneck_size if bottleneck_size is not None else max(1, int(hidden_size // reduction_factor))
        self.hidden_size, self.bottleneck_size = hidden_size, r
        self.activation = canonical_activation(activation)
        self.scaling = float(scaling)
        self.backend = backend
        self.down = nn.Linear(hidden_size, r)
        self.up = nn.Linear(r, hidden_size)
        with torch.no_grad():
            if init_weights == "bert":
                self.down.weight.normal_(0.0, 0.02)
            elif init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            else:
                raise ValueError(f"init_weights must be 'bert' or 'mam_adapter', got {init_weights!r}")
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def _params(self, dtype):
        return [p if p.dtype == dtype else p.to(dtype)
                for p in (self.down.weight, self.down.bias, self.up.weight, self.up.bias)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden_size) -> (..., hidden_size)."""
        self._check(x, "x")
        return bottleneck_adapter(x, *self._params(x.dtype), activation=self.activation, scaling=self.scaling,
                                  backend=self.backend)

    def forward_layernorm(self, h: torch.Tensor, input_tensor: torch.Tensor, layer_norm: nn.LayerNorm,
                          original_ln_before: bool = False) -> torch.Tensor:
        """Adapter + residual + `layer_norm` in one op (see effir.bottleneck_adapter_layernorm)."""
        self._check(h, "h")
        # autocast: the sub-block output is bf16 while the residual stream is fp32. That mixed pair goes to the op
        # as it is (sums and LayerNorms in fp32, as torch's promoting add and fp32 layer_norm; the adapter's
        # products on 16-bit operands, as autocast runs nn.Linear); other pairs are widened to the wider dtype
        dt = torch.promote_types(h.dtype, input_tensor.dtype)
        mixed = h.dtype in (torch.float16, torch.bfloat16) and input_tensor.dtype == torch.float32
        if not mixed:
            h = h.to(dt)
        w = layer_norm.weight if layer_norm.weight.dtype == dt else layer_norm.weight.to(dt)
        b = layer_norm.bias if layer_norm.bias.dtype == dt else layer_norm.bias.to(dt)
        input_tensor = input_tensor.to(dt)
        return bottleneck_adapter_layernorm(h, input_tensor, *self._params(h.dtype), w, b,
                                            activation=self.activation, scaling=self.scaling, eps=layer_norm.eps,
                                            original_ln_before=original_ln_before, backend=self.backend)

    def _check(self, x, name):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (..., {self.hidden_size}) (the adapter's hidden_size), "
                             f"got {shape}")

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation!r}, scaling={self.scaling}, backend={self.backend!r}")
