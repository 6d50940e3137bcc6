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
