"""effir's injected adapters vs AdapterHub (`adapters` 1.3, peers env): same hidden states and adapter
gradients for seq_bn / double_seq_bn / par_bn on a random-weight XLM-R, fewer saved activation bytes, and
adapters moving both ways between the two libraries' saved formats."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["seq_bn", "double_seq_bn", "par_bn"]
FP32_ATOL = 1e-5  # hidden states are LayerNorm outputs of size ~1: a few fp32 ulps after 2 layers
FP32_RTOL = 1e-5
# AdapterHub configs effir computes: the presets and variants of their fields
INTEROP_OK = [("seq_bn", {}), ("double_seq_bn", {}), ("par_bn", {}),
              ("seq_bn", {"leave_out": [1], "reduction_factor": 8, "non_linearity": "gelu", "scaling": 0.5}),
              ("double_seq_bn", {"mh_adapter": False, "non_linearity": "relu", "init_weights": "mam_adapter"}),
              ("par_bn", {"leave_out": [0, 2], "scaling": 2.0, "non_linearity": "swish"})]
# and ones it must refuse, with the field that it cannot compute
INTEROP_REFUSED = [("seq_bn", {"use_gating": True}), ("seq_bn", {"ln_before": True}), ("seq_bn", {"ln_after": True}),
                   ("seq_bn", {"scaling": "learned"}), ("seq_bn", {"non_linearity": "gelu_new"}),
                   ("seq_bn", {"original_ln_after": False}), ("seq_bn", {"residual_before_ln": False}),
                   ("seq_bn", {"phm_layer": True, "reduction_factor": 8})]


@pytest.fixture(scope="module")
def peer_result(peer_python):
    payload = {"parity": {"configs": CONFIGS, "backends": ["reference", "recompute", "triton"]},
               "memory": {"configs": CONFIGS, "layers": 12, "hidden": 192, "heads": 4, "intermediate": 768,
                          "batch": 2, "seq": 32, "backend": "recompute"},
               "interop": {"cases": [[c, o] for c, o in INTEROP_OK + INTEROP_REFUSED]}}
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    proc = subprocess.run([str(peer_python), str(REPO / "tests" / "_adapterhub_peer.py"), "all", json.dumps(payload)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("backend", ["reference", "recompute", "triton"])
@pytest.mark.parametrize("config", CONFIGS)
def test_same_hidden_states_and_grads_as_adapterhub(peer_result, config, backend):
    r = peer_result["parity"][f"{config}/{backend}"]
    assert r["hidden_max_abs"] <= FP32_ATOL, r
    assert r["hidden_max_rel"] <= FP32_RTOL, r
    assert r["grad_max_rel"] <= 1e-5, r
    assert r["trainable_effir"] == r["trainable_hub"], r  # same adapter sizes: same r, same placements
    assert r["backbone_params_with_grad"] == [], r  # the backbone is frozen
    assert r["n_adapter_tensors"] == (16 if config == "double_seq_bn" else 8)


def test_saved_activation_bytes_below_adapterhub(peer_result):
    """12-layer XLM-R-like encoder, fp32: effir's seq_bn no longer saves the LayerNorm-1 output (adapter input,
    d-wide), the second LayerNorm's input (d-wide) and the activation output (r-wide), so its training step
    saves at least layers x tokens x (d + r) x 4 bytes less than AdapterHub's; for double_seq_bn and par_bn
    (whose fused op keeps its two d-wide inputs) at least the r-wide intermediates."""
    m = peer_result["memory"]
    tokens, d, layers = m["tokens"], m["hidden"], m["layers"]
    r = m["bottleneck/seq_bn"]
    drop = m["adapterhub/seq_bn"] - m["effir/seq_bn"]
    assert drop >= layers * tokens * (d + r) * 4, m
    # the adapted step saves no more than the frozen backbone alone
    assert m["effir/seq_bn"] <= m["backbone_only"], m
    r2 = m["bottleneck/double_seq_bn"]
    assert m["adapterhub/double_seq_bn"] - m["effir/double_seq_bn"] >= 2 * layers * tokens * r2 * 4, m
    r3 = m["bottleneck/par_bn"]
    assert m["adapterhub/par_bn"] - m["effir/par_bn"] >= layers * tokens * r3 * 4, m


def _interop(peer_result, preset, overrides):
    return peer_result["interop"][f"{preset}/{json.dumps(overrides, sort_keys=True)}"]


@pytest.mark.parametrize("preset,overrides", INTEROP_OK, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_adapterhub_adapters_load_into_effir_and_back(peer_result, preset, overrides):
    """An adapter saved by AdapterHub (torch and safetensors files) runs in effir with AdapterHub's hidden states,
    and effir's save_adapters(format="adapterhub") gives AdapterHub (a model with a head) the same adapter."""
    r = _interop(peer_result, preset, overrides)
    assert "error" not in r, r
    assert r["adapter_output_change"] > 1e-2, r  # the adapter changes the output: the comparison means something
    assert r["hub_to_effir_max_abs"] <= FP32_ATOL, r
    assert r["effir_to_hub_max_abs"] <= FP32_ATOL, r
    assert r["converted_to_hub_max_abs"] <= FP32_ATOL, r  # python -m effir.adapters convert --to adapterhub
    assert r["params_hub"] == r["params_effir"] == r["params_back"] > 0, r
    assert r["name"] == r["name_back"] == "x", r


@pytest.mark.parametrize("preset,overrides", INTEROP_REFUSED, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_adapterhub_configs_effir_cannot_compute_are_refused(peer_result, preset, overrides):
    r = _interop(peer_result, preset, overrides)
    field = next(iter(overrides))
    assert "error" in r and field in r["error"], r
