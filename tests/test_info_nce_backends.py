"""Pure-PyTorch backends ("reference", "chunked") against float64: every option x dtype, odd shapes,
gradcheck, torch.compile(fullgraph=True), hypothesis shapes, the memory bound, the nn.Module."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effir.losses import InfoNCELoss, info_nce
from effir.ops import info_nce_chunked
from effir.reference.info_nce import info_nce_reference
from tests._info_nce_util import check_backend, make_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("learnable_t", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("M", [0, 17])
def test_chunked_options(M, symmetric, groups, reduction, learnable_t, dtype):
    check_backend("chunked", 33, M, 64, dtype, symmetric=symmetric, groups=groups, reduction=reduction,
                  learnable_t=learnable_t, seed=M + 3 * symmetric + 5 * groups)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 64, 384, 768, 1000])
def test_chunked_dims(d, dtype):
    check_backend("chunked", 29, 11, d, dtype, symmetric=True, groups=True, reduction="none", learnable_t=True,
                  seed=d)


@pytest.mark.parametrize("B,M", [(1, 0), (1, 3), (2, 1), (129, 0)])
def test_chunked_small_and_odd_batches(B, M):
    check_backend("chunked", B, M, 7, torch.float32, symmetric=True, groups=B > 1, learnable_t=True)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_block_boundaries_float64(chunk):
    """Chunks smaller than B and not dividing B or N: identical (to fp64 rounding) to the reference."""
    q, p, neg, qg, dg = make_inputs(13, 6, 10, torch.float64, groups=True, seed=chunk)
    docs = torch.cat([p, neg])
    t = torch.tensor(0.07, dtype=torch.float64)
    loss, lse, _ = info_nce_chunked.forward(q, docs, t, qg, dg, 0, True, chunk=chunk)
    want = torch.stack([
        info_nce_reference(q, p, neg, temperature=0.07, query_groups=qg, doc_groups=dg, reduction="none"),
        2 * info_nce_reference(q, p, neg, temperature=0.07, symmetric=True, query_groups=qg, doc_groups=dg,
                               reduction="none")
        - info_nce_reference(q, p, neg, temperature=0.07, query_groups=qg, doc_groups=dg, reduction="none")])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(2, 13, dtype=torch.float64)
    dq, dd = info_nce_chunked.backward(q, docs, t, lse, g, qg, dg, 0, chunk=chunk)
    dq_ref, dd_ref = info_nce_chunked.backward(q, docs, t, lse, g, qg, dg, 0, chunk=10**6)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dd, dd_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_gradcheck_float64(symmetric):
    q, p, neg, qg, dg = make_inputs(5, 3, 4, torch.float64, groups=True, seed=11)
    t = torch.tensor(0.3, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, p, neg, t)]

    def f(q, p, n, t):
        return info_nce(q, p, n, temperature=t, symmetric=symmetric, query_groups=qg, doc_groups=dg,
                        reduction="none", backend="chunked")

    assert torch.autograd.gradcheck(f, leaves)


def test_torch_compile_fullgraph_chunked_and_reference():
    q, p, neg, qg, dg = make_inputs(9, 4, 16, torch.float32, groups=True, seed=12)
    t = torch.tensor(0.05, requires_grad=True)
    for backend in ("chunked", "reference"):
        def f(q, p, n, t):
            return info_nce(q, p, n, temperature=t, symmetric=True, query_groups=qg, doc_groups=dg,
                            backend=backend)

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        leaves = [x.clone().requires_grad_(True) for x in (q, p, neg)]
        out = compiled(*leaves, t)
        grads = torch.autograd.grad(out, leaves + [t])
        leaves2 = [x.clone().requires_grad_(True) for x in (q, p, neg)]
        want = f(*leaves2, t)
        want_grads = torch.autograd.grad(want, leaves2 + [t])
        torch.testing.assert_close(out, want)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 40), M=st.integers(0, 20), d=st.integers(1, 70), symmetric=st.booleans(),
       groups=st.booleans(), chunk=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_chunked_hypothesis_shapes(B, M, d, symmetric, groups, chunk, seed):
    old = info_nce_chunked.BLOCK_ELEMS
    info_nce_chunked.BLOCK_ELEMS = chunk * B  # several blocks per call
    try:
        check_backend("chunked", B, M, d, torch.float32, symmetric=symmetric, groups=groups, reduction="none",
                      learnable_t=True, seed=seed)
    finally:
        info_nce_chunked.BLOCK_ELEMS = old


def test_chunked_memory_is_blockwise():
    """Test-sized version of the CPU target: fwd+bwd at B = N = 2048, d = 128 (fp32) uses <= 1/8 of the
    reference backend's peak (the full check at 8192 x 768 is in bench/bench_loss.py)."""
    from bench._common import PeakMemory

    q, p, _, _, _ = make_inputs(2048, 0, 128, torch.float32, seed=13)
    peaks = {}
    for backend in ("reference", "chunked"):
        leaves = [x.clone().requires_grad_(True) for x in (q, p)]
        with PeakMemory("cpu") as pm:
            loss = info_nce(*leaves, backend=backend)
            loss.backward()
            del loss
        peaks[backend] = pm.peak
    # the reference holds at least the 16 MiB score matrix and its softmax
    assert peaks["reference"] >= 2 * 2048 * 2048 * 4, peaks
    assert peaks["chunked"] <= peaks["reference"] / 8, peaks


def test_module_learnable_temperature_and_config():
    q, p, neg, qg, dg = make_inputs(6, 2, 8, torch.float32, groups=True, seed=14)
    mod = InfoNCELoss(temperature=0.07, learnable_temperature=True, symmetric=True, backend="chunked")
    assert isinstance(mod.log_temperature, torch.nn.Parameter)
    out = mod(q, p, neg, qg, dg)
    out.backward()
    assert mod.log_temperature.grad is not None and torch.isfinite(mod.log_temperature.grad)
    # d loss / d log t = t * d loss / d t, checked against the float64 reference
    t64 = torch.tensor(0.07, dtype=torch.float64).log().requires_grad_(True)
    ref = info_nce_reference(q.double(), p.double(), neg.double(), temperature=t64.exp(), symmetric=True,
                             query_groups=qg, doc_groups=dg)
    ref.backward()
    torch.testing.assert_close(mod.log_temperature.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)
    cfg = mod.get_config_dict()
    assert cfg["symmetric"] is True and cfg["learnable_temperature"] is True
    assert abs(cfg["temperature"] - 0.07) < 1e-6
    fixed = InfoNCELoss(temperature=0.05, backend="chunked")
    assert not any(True for _ in fixed.parameters())
    torch.testing.assert_close(fixed(q, p), info_nce(q, p, backend="chunked"))


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_masked_translation_is_as_if_absent(backend):
    """Backend-level masking semantics: a translation of positive 3 in its group leaves row 3 (and, in the
    symmetric direction, positive 3's row) exactly as if the translation were not there; unmasked it counts."""
    q, p, _, _, _ = make_inputs(7, 0, 12, torch.float64, seed=15)
    q[3] = p[3]
    tr = p[3:4] * 0.99 + 0.01 * q[0:1]
    qg = torch.arange(7)
    dg = torch.cat([torch.arange(7), torch.tensor([3])])
    kw = dict(temperature=0.05, reduction="none", backend=backend)
    masked = info_nce(q, p, tr, query_groups=qg, doc_groups=dg, **kw)
    absent = info_nce(q, p, None, **kw)
    unmasked = info_nce(q, p, tr, **kw)
    torch.testing.assert_close(masked[3], absent[3], rtol=1e-12, atol=1e-12)
    assert unmasked[3] > absent[3] + 0.3
    # symmetric: queries 3 and 5 declared translations of each other (same group)
    qg2 = torch.tensor([0, 1, 2, 3, 4, 3, 6])
    dg2 = torch.tensor([0, 1, 2, 3, 4, 3, 6])
    sym = info_nce(q, p, None, symmetric=True, query_groups=qg2, doc_groups=dg2, **kw)
    keep = [0, 1, 2, 3, 4, 6]  # row 3 without column 5 and positive 3 without query 5
    s = (q @ p.T) / 0.05
    want = (torch.logsumexp(s[3, keep], 0) - s[3, 3] + torch.logsumexp(s[keep, 3], 0) - s[3, 3]) / 2
    torch.testing.assert_close(sym[3], want, rtol=1e-12, atol=1e-12)
