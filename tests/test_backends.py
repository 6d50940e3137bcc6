"""backend="auto": what it picks per op and device (the choices follow the H100 measurements, effir/backends.py)."""
import pytest
import torch

from effir.backends import resolve_backend


def test_auto_on_cpu_is_the_memory_lean_torch_path():
    assert resolve_backend("loss", "auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("adapter", "auto", torch.device("cpu")) == "recompute"


def test_auto_adapter_on_gpu_is_plain_autograd():
    # measured: the fused Triton adapter took 2.51 ms against 1.31 ms of plain autograd on an H100; this
    # choice needs no GPU to be made, so it is checked here too
    assert resolve_backend("adapter", "auto", torch.device("cuda")) == "reference"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("loss", "fastest", torch.device("cpu"))
