"""`python -m effir.train` options: config files (JSON, TOML), flag precedence, validation (one tiny random
encoder for --adapter-backend, no model loaded otherwise)."""
import json

import pytest

import effir
from effir.train import config_from_args, main
from effir.training.config import TrainConfig
from effir.training.loop import linear_warmup_decay, param_groups, resolve_precision


def test_defaults_are_the_issue_defaults():
    cfg = config_from_args([])
    assert cfg.adapters == "seq_bn" and cfg.sampling == "hybrid" and cfg.alpha == 0.5
    assert cfg.model == "multilingual-e5-small" and cfg.reduction_factor is None  # seq_bn's own default: 16
    assert cfg.weight_decay == 0.01 and cfg.temperature == 0.05
    assert cfg.sources == ["bipar", "xlinghealth", "tquad", "arcd", "cmrc2018", "iapp"]
    assert cfg.eval_sets == ["xquad-r", "mlqa-r"] and cfg.eval_before and cfg.eval_after
    assert cfg.resolved_lr() == 1e-3
    assert cfg.replace(adapters="none").resolved_lr() == 3e-5


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_file_then_flags_override(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"batch-size": 8, "sampling": "cross", "lr": 1e-3, "languages": ["en", "zh"]}))
    else:
        path.write_text('batch_size = 8\nsampling = "cross"\nlr = 1e-3\nlanguages = ["en", "zh"]\n')
    cfg = config_from_args(["--config", str(path), "--lr", "2e-4"])
    assert cfg.batch_size == 8 and cfg.sampling == "cross" and cfg.languages == ["en", "zh"]
    assert cfg.lr == 2e-4  # the flag wins over the file
    cfg2 = config_from_args(["--config", str(path), "--max-length", "32", "--no-eval"])
    assert cfg2.max_query_length == cfg2.max_passage_length == 32
    assert not cfg2.eval_before and not cfg2.eval_after


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"batchsize": 8}))
    with pytest.raises(ValueError, match="unknown option"):
        config_from_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="not found"):
        config_from_args(["--config", str(tmp_path / "missing.toml")])
    yml = tmp_path / "x.yaml"
    yml.write_text("a: 1")
    with pytest.raises(ValueError, match=".json or .toml"):
        config_from_args(["--config", str(yml)])


@pytest.mark.parametrize("changes, match", [
    ({"alpha": 1.5}, "--alpha"),
    ({"batch_size": 1}, "--batch-size"),
    ({"lr": -1.0}, "--lr"),
    ({"temperature": 0.0}, "--temperature"),
    ({"steps": 0}, "--steps"),
    ({"steps": 3, "epochs": 1.0}, "either --steps or --epochs"),
    ({"sampling": "random"}, "--sampling"),
    ({"precision": "fp8"}, "--precision"),
    ({"resume": True}, "--resume needs --output-dir"),
    ({"mini_batch_size": 0}, "--mini-batch-size must be a positive integer"),
    ({"hard_negatives": -1}, "--hard-negatives must be an integer >= 0"),
    ({"mini_batch_size": True}, "--mini-batch-size must be a positive integer"),
    ({"init_adapters": ".", "adapters": "none"}, "--init-adapters .* --adapters none"),
    ({"init_adapters": ".", "reduction_factor": 8.0}, "--reduction-factor cannot change"),
    ({"init_adapters": "/nonexistent/adapter"}, "--init-adapters: not a directory"),
    ({"adapter_backend": "fastest"}, "--adapter-backend must be one of"),
    ({"adapter_backend": "triton", "adapters": "none"}, "--adapter-backend .* --adapters none"),
])
def test_validation_names_the_option(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig().replace(**changes).validate()


def test_main_reports_bad_options_without_training(capsys):
    assert main(["--alpha", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "--alpha" in err


def test_schedule_and_param_groups():
    fn = linear_warmup_decay(2, 10)
    vals = [fn(s) for s in range(11)]
    assert vals[0] < vals[1] < 1.0 and vals[2] == 1.0 and vals[10] == 0.0
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))
    import torch

    lin = torch.nn.Linear(3, 4)
    ln = torch.nn.LayerNorm(4)
    named = [("dense.weight", lin.weight), ("dense.bias", lin.bias), ("LayerNorm.weight", ln.weight)]
    groups = param_groups(named, 0.01)
    assert groups[0]["weight_decay"] == 0.01 and groups[0]["params"] == [lin.weight]
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 2


def test_precision_resolution_on_cpu():
    import torch

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp16", cpu) == "fp16"


def test_training_run_stays_a_function_after_its_module_loads():
    """`effir.training.run` is the API function; importing the implementation module must not replace it."""
    import effir.training
    import effir.training.runner  # noqa: F401

    from effir.training import run

    assert callable(run) and run is effir.training.run and not isinstance(run, type(effir.training))


def test_no_unpad_flag_reaches_the_config():
    from effir.train import build_parser

    assert TrainConfig().unpad is True
    args = build_parser().parse_args(["--no-unpad"])
    assert args.unpad is False


def test_adapter_backend_reaches_the_adapters():
    """--adapter-backend sets the backend of every adapter module the run adds (here: the fused Triton op)."""
    from effir.encoders import random_encoder
    from effir.train import build_parser
    from effir.training.runner import attach_adapters

    assert build_parser().parse_args(["--adapter-backend", "triton"]).adapter_backend == "triton"
    enc = random_encoder("labse", seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)
    attach_adapters(TrainConfig().replace(adapter_backend="triton").validate(), enc)
    mods = [m for m in enc.model.modules() if isinstance(m, effir.BottleneckAdapter)]
    assert mods and all(m.backend == "triton" for m in mods)
