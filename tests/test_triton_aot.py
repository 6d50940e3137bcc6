"""Ahead-of-time compile of the Triton kernels for real GPUs (sm_90 H100, sm_80 A100), no GPU needed.

The CPU suite runs the kernels under TRITON_INTERPRET=1, which never reaches Triton's compiler: these tests
compile the quick subset of bench/triton_aot.py with the launchers' exact launch configurations and check what
only a real compile shows: the front end accepts the kernels, 16-bit kernels do not spill on sm_90, the 16-bit
loss kernels run on tensor cores, registers fit the 255 limit.
"""
from __future__ import annotations

import pytest

from bench import triton_aot

pytestmark = pytest.mark.triton

SM80_ONLY = {
    ("info_nce._fwd_kernel", "bf16 d=768 no-groups 128x128x64"),
    ("bottleneck_adapter._bwd_rows_kernel", "bf16 d=768 r=48 silu pfeiffer"),
}


def _toolchain():
    err = triton_aot.toolchain_error()
    if err:
        pytest.skip(f"cannot compile for NVIDIA targets: {err}")


@pytest.fixture(scope="module")
def sm90():
    _toolchain()
    return triton_aot.compile_all(90, quick=True)


@pytest.fixture(scope="module")
def sm80():
    _toolchain()
    return triton_aot.compile_all(80, quick=False, only=SM80_ONLY)


def _name(r):
    return f"sm_{r['arch']} {r['kernel']} [{r['variant']}]"


def _root(r):
    return r["error"].strip().splitlines()[-1][:160]


def test_quick_subset_covers_every_kernel(sm90):
    assert {k for k, _ in triton_aot.QUICK} == triton_aot.all_kernel_names(), "QUICK misses a kernel"
    missing = triton_aot.QUICK - {(r["kernel"], r["variant"]) for r in sm90}
    assert not missing, f"QUICK names variants the launchers no longer make: {sorted(missing)}"


@pytest.mark.parametrize("arch", [90, 80])
def test_every_variant_compiles(arch, sm90, sm80):
    rows = sm90 if arch == 90 else sm80
    failed = [f"{_name(r)}: {_root(r)}" for r in rows if r["error"]]
    assert not failed, "compile failures:\n" + "\n".join(failed)


# The adapter's row-gradient kernel at its 16-bit default tile spills on sm_90 and was still measured fastest on
# an H100 (kernels/bottleneck_adapter._TILE_16BIT: 356 B per thread with the seq_bn layout, 641 us against 784 us
# for a tile that does not spill). It may spill up to this much; every other 16-bit kernel not at all.
MEASURED_SPILLS = {"bottleneck_adapter._bwd_rows_kernel": 512}


def test_16bit_variants_do_not_spill_on_sm90(sm90):
    """The performance targets are H100/H200 (sm_90). On sm_80 (no wgmma: accumulators and operands all in
    registers) a few of the same tiles spill a little; that is reported by the CLI, not asserted."""
    rows = [r for r in sm90 if r["dtype"] in ("bf16", "fp16") and not r["error"]]
    assert rows
    assert all(r["n_spills"] is not None for r in rows), "ptxas -v log not parsed"
    spills = [f"{_name(r)}: {r['n_regs']} regs, {r['n_spills']} B spill stores, {r['spill_loads_bytes']} B spill "
              f"loads, {r['local_mem_instructions']} LDL/STL" for r in rows
              if r["n_spills"] > MEASURED_SPILLS.get(r["kernel"], 0)]
    assert not spills, "16-bit kernels spill:\n" + "\n".join(spills)


def test_16bit_loss_kernels_use_tensor_cores(sm90, sm80):
    rows = [r for r in sm90 + sm80 if r["family"] == "loss" and r["dtype"] in ("bf16", "fp16")]
    assert {r["kernel"] for r in rows} == {k for k in triton_aot.all_kernel_names() if k.startswith("info_nce.")}
    bad = [f"{_name(r)}: {'not compiled: ' + _root(r) if r['error'] else 'no HGMMA/HMMA'}" for r in rows
           if r["error"] or r["hgmma"] + r["hmma"] == 0]
    assert not bad, "16-bit loss kernels without tensor-core instructions:\n" + "\n".join(bad)


def test_registers_within_limit(sm90, sm80):
    rows = [r for r in sm90 + sm80 if not r["error"]]
    assert rows and all(r["n_regs"] is not None for r in rows), "ptxas -v log not parsed"
    over = [f"{_name(r)}: {r['n_regs']}" for r in rows if r["n_regs"] > 255]
    assert not over, "\n".join(over)


def test_loss_gemms_keep_wgmma_pipelined(sm90):
    """ptxas C7513/C7515 = wgmma serialised: the blocked backward's GEMM and the forward must not get it (a
    128 x 128 tile on 8 warps did, for the GEMM); it would cost much of their tensor-core throughput."""
    rows = [r for r in sm90 if r["kernel"] in ("info_nce._mm_acc_kernel", "info_nce._fwd_kernel",
                                               "info_nce._bwd_dscores_kernel") and r["dtype"] in ("bf16", "fp16")]
    assert rows
    bad = [f"{_name(r)}: {n.strip()[:120]}" for r in rows for n in r.get("ptxas_notes") or []
           if "C7513" in n or "C7515" in n]
    assert not bad, "\n".join(bad)
