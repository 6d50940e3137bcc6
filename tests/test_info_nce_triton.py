"""Triton backend against float64 (CPU: under TRITON_INTERPRET=1, so sizes stay tiny, B <= 33)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effir.backends import triton_runs_on
from tests._info_nce_util import check_backend

pytestmark = [
    pytest.mark.triton,
    # the interpreter evaluates padded rows (exp2 overflow, log2(0)) whose results are masked out at the store
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),  # interpreter internals
]
if not triton_runs_on(torch.device("cpu")):
    pytest.skip("triton not installed or TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("M", [0, 7])
def test_triton_options(M, symmetric, groups, dtype):
    check_backend("triton", 21, M, 24, dtype, symmetric=symmetric, groups=groups, reduction="none",
                  learnable_t=True, seed=M + 3 * symmetric + 5 * groups)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_reductions(reduction):
    check_backend("triton", 17, 5, 20, torch.float32, symmetric=True, groups=True, reduction=reduction)


@pytest.mark.parametrize("d", [1, 7, 64, 384, 768, 1000])
def test_triton_dims(d):
    check_backend("triton", 5, 3, d, torch.bfloat16 if d % 2 else torch.float32, symmetric=True, groups=True,
                  reduction="none", learnable_t=True, seed=d)


@pytest.mark.parametrize("B,M", [(1, 0), (1, 2), (33, 0)])
def test_triton_odd_batches(B, M):
    check_backend("triton", B, M, 9, torch.float16, symmetric=True, groups=B > 1, reduction="none",
                  learnable_t=True)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 33), M=st.integers(0, 17), d=st.integers(1, 40), symmetric=st.booleans(),
       groups=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_hypothesis_shapes(B, M, d, symmetric, groups, seed):
    check_backend("triton", B, M, d, torch.float32, symmetric=symmetric, groups=groups, reduction="none",
                  learnable_t=True, seed=seed)


@pytest.mark.parametrize("groups", [False, True])
def test_triton_pos_offset_matches_chunked(groups):
    """The gather layout (positive of row i at docs[offset + i]) in the kernels, against the chunked backend."""
    from effir.ops import info_nce_chunked, info_nce_triton

    g = torch.Generator().manual_seed(21)
    q, docs = torch.randn(6, 20, generator=g), torch.randn(19, 20, generator=g)
    qg = torch.randint(0, 3, (6,), generator=g) if groups else None
    dg = torch.randint(0, 3, (19,), generator=g) if groups else None
    t = torch.tensor(0.5)
    want = info_nce_chunked.forward(q.double(), docs.double(), t.double(), qg, dg, 7, False)
    got = info_nce_triton.forward(q, docs, t, qg, dg, 7, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    gl = torch.rand(1, 6, generator=g, dtype=torch.float64)
    want = info_nce_chunked.backward(q.double(), docs.double(), t.double(), want[1], gl, qg, dg, 7)
    got = info_nce_triton.backward(q, docs, t, got[1], gl.float(), qg, dg, 7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["blocked-small", "blocked-small-column", "blocked-small-cublas", "blocked"])
def test_triton_backward_variants(variant, dtype, monkeypatch):
    """The blocked backward; "blocked-small" cuts dS into 16 x 32 blocks (3 x 2 blocks with remainders on both
    sides), so the block offsets of the dS kernel and every GEMM step (first, middle, last) are exercised at
    interpreter sizes, in both tile orders of the GEMM."""
    from effir.ops import info_nce_triton

    monkeypatch.setenv("EFFIR_TRITON_GEMM_ORDER", "column" if variant.endswith("column") else "row")
    monkeypatch.setenv("EFFIR_TRITON_LOSS_GEMM", "cublas" if variant.endswith("cublas") else "triton")
    if variant.startswith("blocked-small"):
        monkeypatch.setattr(info_nce_triton, "block_shape", lambda B, N, d: (16, 32))
    check_backend("triton", 33, 9, 24, dtype, symmetric=True, groups=True, reduction="none", learnable_t=True,
                  seed=11)


@pytest.mark.parametrize("B,N,d", [(32768, 32768, 768), (65536, 65536, 384), (4096, 4096, 768), (7, 9, 5),
                                   (300, 300, 7), (512, 512, 768), (1, 100000, 1000), (100000, 1, 64)])
@pytest.mark.parametrize("factor", [1, 2])
def test_blocked_backward_block_shape(B, N, d, factor):
    """dS blocks: inside the matrix, at most factor (B + N) d entries (or 2**16), never all of a (B, N) above
    2**16."""
    from effir.ops.info_nce_triton import block_shape

    rows, cols = block_shape(B, N, d, factor)
    assert 1 <= rows <= B and 1 <= cols <= N
    assert rows * cols <= max(factor * (B + N) * d, 1 << 16)
    if B * N > (1 << 16):
        assert rows * cols < B * N
    if (B, N, d) == (32768, 32768, 768):  # 32 blocks of 64 MiB bf16 dS, or 16 square ones of 128 MiB
        assert (rows, cols) == ((8192, 4096) if factor == 1 else (8192, 8192))


def test_ds_block_factor_env(monkeypatch):
    from effir.ops.info_nce_triton import block_shape, ds_block_factor

    monkeypatch.delenv("EFFIR_TRITON_DS_BLOCK", raising=False)
    assert ds_block_factor() == 2
    monkeypatch.setenv("EFFIR_TRITON_DS_BLOCK", "1")
    assert block_shape(32768, 32768, 768) == (8192, 4096)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_single_candidate_is_exactly_zero(dtype, symmetric):
    """One query, one passage: softmax over one logit is 1, so loss, every gradient and d/dt are exactly 0 in
    torch. The kernels must give exact zeros too (the first H100 run gave ~1e-8 residues at B = 1, M = 0 when
    LOG2E was folded into the logits), not merely small values."""
    from effir.losses import info_nce

    g = torch.Generator().manual_seed(11)
    q, p = (torch.randn(1, 7, generator=g).to(dtype).requires_grad_() for _ in range(2))
    t = torch.tensor(0.05, requires_grad=True)
    loss = info_nce(q, p, temperature=t, symmetric=symmetric, backend="triton")
    loss.backward()
    for name, v in (("loss", loss), ("dq", q.grad), ("dp", p.grad), ("dt", t.grad)):
        assert torch.count_nonzero(v.detach()) == 0, f"{name} = {v} is not exactly 0"
