"""backend="auto": what it picks per op and device (the choices follow the H100 measurements, effir/backends.py)."""
import pytest
import torch

from effir.backends import resolve_backend


def test_auto_on_cpu_is_the_memory_lean_torch_path():
    assert resolve_backend("loss", "auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("adapter", "auto", torch.device("cpu")) == "recompute"


def test_auto_adapter_on_gpu_follows_the_h100_runs(monkeypatch):
    # measured (H100 run 5): the fused Triton adapter + LayerNorm 1.10 ms against 1.34 ms of plain autograd; the
    # plain adapter's fused kernel is untimed since its retuning, so plain autograd. No GPU needed to check it
    from effir import backends

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(backends, "triton_runs_on", lambda device: True)
    assert resolve_backend("adapter", "auto", cuda, bf16) == "reference"
    assert resolve_backend("adapter_ln", "auto", cuda, bf16) == "triton"
    assert resolve_backend("adapter_ln", "auto", cuda, torch.float16) == "triton"
    # autocast's mix (fp32 residual stream): plain autograd measured faster there (H100 runs 6-8)
    assert resolve_backend("adapter_ln", "auto", cuda, torch.float32) == "reference"
    monkeypatch.setattr(backends, "triton_runs_on", lambda device: False)
    with pytest.warns(RuntimeWarning, match="Triton is not installed"):
        assert resolve_backend("adapter_ln", "auto", cuda, bf16) == "reference"
    assert resolve_backend("adapter_ln", "auto", torch.device("cpu"), bf16) == "recompute"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("loss", "fastest", torch.device("cpu"))
