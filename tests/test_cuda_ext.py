"""The CUDA extension (effir._C, csrc/): build description on CPU; float64-reference checks on a GPU.

CPU (always): csrc_build lists existing sources and targets sm_90a; backend="cuda" on CPU tensors, or without
the compiled extension, raises the clear error of effir.backends (never a silent swap).
GPU (marked gpu; skipped on CPU with the reason): backend="cuda" against the float64 references with the same
rule as the Triton tests (tests/_errors.py), every option of both ops, odd shapes, fp32/fp16/bf16.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import csrc_build
from effir.backends import cuda_extension_error, resolve_backend

REPO = Path(__file__).resolve().parent.parent


def test_extension_kwargs_sources_and_flags():
    kw = csrc_build.extension_kwargs()
    assert kw["name"] == "effir._C"
    assert kw["sources"], "no sources listed"
    for src in kw["sources"]:
        assert (REPO / src).is_file(), f"listed source {src} does not exist"
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc
    assert "--use_fast_math" not in nvcc  # the log-sum-exp relies on accurate expf / logf
    assert any(f.startswith("-std=c++") for f in nvcc)
    jit = csrc_build.jit_kwargs()
    assert all(Path(s).is_file() for s in jit["sources"])


def test_gencode_override(monkeypatch):
    monkeypatch.setenv("EFFIR_CUDA_GENCODE", "90a")
    assert csrc_build.gencode_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]


def test_cuda_backend_on_cpu_raises_clear_error():
    for op in ("loss", "adapter"):
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            resolve_backend(op, "cuda", torch.device("cpu"))


def test_public_ops_refuse_cuda_on_cpu():
    effir = importlib.import_module("effir")
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        effir.info_nce(q, p, backend="cuda")
    x = torch.randn(3, 8)
    wd, bd, wu, bu = torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        effir.bottleneck_adapter(x, wd, bd, wu, bu, backend="cuda")


def test_wrapper_says_when_extension_is_missing():
    if cuda_extension_error() is None:
        pytest.skip("effir._C is built here; the missing-extension message cannot be seen")
    from effir.ops import _cuda_ext

    _cuda_ext._LOADED = False
    with pytest.raises(RuntimeError, match="EFFIR_BUILD_CUDA=1"):
        _cuda_ext.ops()


# ---------------------------------------------------------------- GPU: float64-reference checks
def _needs_ext():
    err = cuda_extension_error()
    if err is not None:
        pytest.skip(f"effir._C not built ({err})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,M,d,symmetric,groups,pos_offset", [
    (1, 0, 7, False, False, 0), (1, 3, 1, True, False, 0), (7, 3, 64, True, True, 0),
    (129, 31, 384, True, True, 0), (200, 57, 1000, False, True, 0), (130, 0, 768, True, False, 0),
    (64, 17, 129, False, True, 64),
])
def test_info_nce_cuda_matches_float64(B, M, d, symmetric, groups, pos_offset, dtype, cuda_device):
    _needs_ext()
    from bench.gpu.cuda_ext import _loss_case

    checks = _loss_case("cuda", B, M, d, dtype, symmetric, groups, 0.05, seed=B + d, pos_offset=pos_offset)
    bad = [c for c in checks if not c["ok"]]
    assert not bad, bad


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", ["plain", "ln_after", "ln_before"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("M,d,r", [(1, 7, 1), (7, 129, 8), (129, 384, 24), (300, 768, 48), (33, 768, 384)])
def test_adapter_cuda_matches_float64(M, d, r, activation, variant, dtype, cuda_device):
    _needs_ext()
    from bench.gpu.cuda_ext import _adapter_case

    checks = _adapter_case("cuda", M, d, r, dtype, activation, variant, seed=M + d + r)
    bad = [c for c in checks if not c["ok"]]
    assert not bad, bad


@pytest.mark.gpu
def test_cuda_ops_are_deterministic(cuda_device):
    _needs_ext()
    from effir.ops import bottleneck_adapter_cuda as ad
    from effir.ops import info_nce_cuda as ln

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(300, 384, device="cuda", generator=g).bfloat16()
    docs = torch.randn(400, 384, device="cuda", generator=g).bfloat16()
    t = torch.tensor(0.05, device="cuda")
    a = ln.forward(q, docs, t, None, None, 0, False)
    gl = torch.randn_like(a[0])
    r1 = ln.backward(q, docs, t, a[1], gl, None, None, 0)
    r2 = ln.backward(q, docs, t, a[1], gl, None, None, 0)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    x = torch.randn(1000, 768, device="cuda", generator=g).bfloat16()
    w = [torch.randn(*s, device="cuda", generator=g).bfloat16() * 0.05 for s in ((48, 768), (48,), (768, 48), (768,))]
    dy = torch.randn_like(x)
    b1 = ad.adapter_bwd(dy, x, *w, "gelu", 1.0)
    b2 = ad.adapter_bwd(dy, x, *w, "gelu", 1.0)
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
