"""The kernels' design knobs (environment variables read per call): every reader rejects an unknown value with
an error that names the variable, and falls back to its default when the variable is unset."""
import pytest
import torch

from effir.ops import info_nce_triton as loss
from kernels import bottleneck_adapter as adapter
from kernels._knobs import env_choice

BF16 = torch.empty(2, dtype=torch.bfloat16)
# (variable, a value it refuses, the reader, what the reader gives when the variable is unset)
KNOBS = [
    ("EFFIR_TRITON_GEMM_ORDER", "diagonal", loss.gemm_order, "row"),
    ("EFFIR_TRITON_LOSS_GEMM", "cutlass", loss.gemm_engine, "cublas"),
    ("EFFIR_TRITON_DS_BLOCK", "3", loss.ds_block_factor, 2),
    ("EFFIR_ADAPTER_TILE", "48x64x8", lambda: adapter._tile("fwd", 768, 48, torch.bfloat16), (32, 128, 64, 4)),
    ("EFFIR_ADAPTER_BWD_TILE", "64x64", lambda: adapter._tile("bwd", 768, 48, torch.bfloat16), (64, 64, 64, 4)),
    ("EFFIR_ADAPTER_A_SCRATCH", "yes", lambda: (adapter.a_scratch(True), adapter.a_scratch(False)), (True, False)),
    ("EFFIR_ADAPTER_FWD_STAGES", "5", lambda: adapter._stages("fwd", BF16), 2),
    ("EFFIR_ADAPTER_BWD_STAGES", "0", lambda: adapter._stages("bwd", BF16, None), 3),
    ("EFFIR_ADAPTER_FWD_MAXNREG", "255", lambda: adapter._maxnreg("fwd"), {}),
    ("EFFIR_ADAPTER_BWD_MAXNREG", "many", lambda: adapter._maxnreg("bwd"), {}),
]


@pytest.mark.parametrize("name,bad,reader,default", KNOBS, ids=[k[0] for k in KNOBS])
def test_knob_default_and_refusal(name, bad, reader, default, monkeypatch):
    monkeypatch.delenv(name, raising=False)
    assert reader() == default
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=name):
        reader()


def test_env_choice_returns_the_set_value(monkeypatch):
    monkeypatch.setenv("EFFIR_TEST_KNOB", "b")
    assert env_choice("EFFIR_TEST_KNOB", ("a", "b"), "a") == "b"


def test_adapter_tile_per_kernel_overrides_the_shared_one(monkeypatch):
    monkeypatch.setenv("EFFIR_ADAPTER_TILE", "128x32x16")
    monkeypatch.setenv("EFFIR_ADAPTER_BWD_TILE", "32x128x4")
    assert adapter._tile("fwd", 768, 48, torch.bfloat16) == (128, 32, 64, 16)
    assert adapter._tile("bwd", 768, 48, torch.bfloat16) == (32, 128, 64, 4)
    assert adapter._tile("bwd", 768, 48, torch.float32) == (64, 64, 64, 8)  # fp32 keeps its default
    assert adapter._tile("fwd", 24, 4, torch.bfloat16) == (128, 32, 16, 16)  # chunks no wider than the row


def test_adapter_tile_default_for_autocasts_mix(monkeypatch):
    """Autocast's mix (fp32 activations, 16-bit weights) has its own row-backward default (more registers per
    element); a set tile applies to it too."""
    for name in ("EFFIR_ADAPTER_TILE", "EFFIR_ADAPTER_FWD_TILE", "EFFIR_ADAPTER_BWD_TILE"):
        monkeypatch.delenv(name, raising=False)
    assert adapter._tile("bwd", 768, 48, torch.bfloat16, mixed=True) == (32, 32, 64, 8)
    assert adapter._tile("fwd", 768, 48, torch.bfloat16, mixed=True) == (32, 128, 64, 4)
    monkeypatch.setenv("EFFIR_ADAPTER_BWD_TILE", "16x128x4")
    assert adapter._tile("bwd", 768, 48, torch.bfloat16, mixed=True) == (16, 128, 64, 4)
    assert adapter._tile("bwd", 768, 48, torch.bfloat16) == (16, 128, 64, 4)


def test_adapter_stages_per_kernel_and_16_bit_only(monkeypatch):
    """EFFIR_ADAPTER_{FWD,BWD}_STAGES set one kernel's pipelining depth each; any wider tensor keeps depth 1."""
    monkeypatch.setenv("EFFIR_ADAPTER_FWD_STAGES", "3")
    monkeypatch.setenv("EFFIR_ADAPTER_BWD_STAGES", "1")
    assert adapter._stages("fwd", BF16, BF16) == 3
    assert adapter._stages("bwd", BF16, None, BF16) == 1
    assert adapter._stages("fwd", BF16, torch.empty(2)) == 1  # autocast's mix: an fp32 residual


def test_adapter_a_scratch_forced_either_way(monkeypatch):
    """EFFIR_ADAPTER_A_SCRATCH: "auto" follows the Pfeiffer LayerNorm in front; "0" / "1" hold for every variant."""
    for v, expect in (("auto", (True, False)), ("1", (True, True)), ("0", (False, False))):
        monkeypatch.setenv("EFFIR_ADAPTER_A_SCRATCH", v)
        assert (adapter.a_scratch(True), adapter.a_scratch(False)) == expect


def test_adapter_maxnreg_per_kernel(monkeypatch):
    """EFFIR_ADAPTER_{FWD,BWD}_MAXNREG become the `maxnreg` launch option of their own kernel only."""
    monkeypatch.delenv("EFFIR_ADAPTER_BWD_MAXNREG", raising=False)
    monkeypatch.setenv("EFFIR_ADAPTER_FWD_MAXNREG", "168")
    assert adapter._maxnreg("fwd") == {"maxnreg": 168} and adapter._maxnreg("bwd") == {}
