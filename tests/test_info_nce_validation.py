"""Bad input: a ValueError that names the argument and what was expected."""
import pytest
import torch

from effir.losses import InfoNCELoss, info_nce


def _ok(B=4, M=2, d=8, dtype=torch.float32):
    return torch.randn(B, d, dtype=dtype), torch.randn(B, d, dtype=dtype), torch.randn(M, d, dtype=dtype)


@pytest.mark.parametrize("case,match", [
    (lambda q, p, n: dict(q=q[0], p=p, negatives=n), r"q must have 2 dims"),
    (lambda q, p, n: dict(q=q, p=p[:3], negatives=n), r"p must have shape \(4, 8\)"),
    (lambda q, p, n: dict(q=q, p=p[:, :7], negatives=n), r"p must have shape \(4, 8\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n[:, :5]), r"negatives must have shape \(\*, 8\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n[0]), r"negatives must have shape"),
    (lambda q, p, n: dict(q=q, p=p.double(), negatives=n), r"p must have dtype in \(float32\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n.half()), r"negatives must have dtype in \(float32\)"),
    (lambda q, p, n: dict(q=q.int(), p=p, negatives=n), r"q must have dtype in"),
    (lambda q, p, n: dict(q=q[:0], p=p[:0], negatives=n), r"q must not be empty"),
    (lambda q, p, n: dict(q=q[:, :0], p=p[:, :0], negatives=None), r"q must not be empty"),
    (lambda q, p, n: dict(q=q.index_fill(0, torch.tensor([1]), float("nan")), p=p, negatives=n),
     r"q contains non-finite"),
    (lambda q, p, n: dict(q=q, p=p.index_fill(1, torch.tensor([0]), float("inf")), negatives=n),
     r"p contains non-finite"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n.index_fill(0, torch.tensor([0]), float("-inf"))),
     r"negatives contains non-finite"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, query_groups=torch.zeros(4, dtype=torch.long)),
     r"doc_groups must be given together with query_groups"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, doc_groups=torch.zeros(6, dtype=torch.long)),
     r"query_groups must be given together with doc_groups"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, query_groups=torch.zeros(3, dtype=torch.long),
                          doc_groups=torch.zeros(6, dtype=torch.long)), r"query_groups must have shape \(4,?\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, query_groups=torch.zeros(4, dtype=torch.long),
                          doc_groups=torch.zeros(4, dtype=torch.long)), r"doc_groups must have shape \(6,?\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, query_groups=torch.zeros(4),
                          doc_groups=torch.zeros(6, dtype=torch.long)), r"query_groups must have dtype in \(int64"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, query_groups=torch.zeros(4, dtype=torch.long),
                          doc_groups=torch.zeros(6, 1, dtype=torch.long)), r"doc_groups must have shape \(6,?\)"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature=0.0), r"temperature must be positive"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature=-1.0), r"temperature must be positive"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature=float("inf")), r"temperature must be positive"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature=torch.tensor([0.1, 0.2])), r"temperature must be"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature=torch.tensor(float("nan"))), r"temperature must"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, temperature="0.05"), r"temperature must be a float"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, reduction="avg"), r"reduction must be one of"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, symmetric="yes"), r"symmetric must be a bool"),
    (lambda q, p, n: dict(q=q, p=p, negatives=n, backend="fast"), r"backend must be one of"),
    (lambda q, p, n: dict(q=q.double(), p=p.double(), negatives=n.double(), backend="triton"),
     r"(float64|triton)"),
    (lambda q, p, n: dict(q=[[1.0]], p=p, negatives=n), r"q must be a torch.Tensor"),
])
def test_bad_input_raises_value_error_naming_argument(case, match):
    q, p, n = _ok()
    kw = case(q, p, n)
    args = (kw.pop("q"), kw.pop("p"), kw.pop("negatives"))
    kw.setdefault("backend", "chunked")
    with pytest.raises((ValueError, RuntimeError), match=match) as info:
        info_nce(*args, **kw)
    if kw["backend"] != "triton":  # triton may be unavailable (RuntimeError from effir.backends) on CPU
        assert info.type is ValueError


def test_device_mismatch_names_argument():
    q, p, n = _ok()
    with pytest.raises(ValueError, match=r"p must be on device cpu"):
        info_nce(q, p.to("meta"), n)


@pytest.mark.parametrize("t", [0.0, -0.1, float("nan"), "0.05", True])
def test_module_rejects_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=t)
