"""The training loop on a tiny random-weight encoder and synthetic groups: resume exactness, Ctrl-C,
checkpoint contents, precisions, full fine-tuning, gradient checkpointing, bad input, the eval round trip."""
import json
import os
import signal

import pytest
import torch

from effir.train import main
from effir.training import TrainConfig, run
from effir.training.checkpoint import checkpoint_path, load_checkpoint

from tests._train_util import losses, tiny_encoders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_encoders(tmp_path_factory)


def _cfg(tiny, out, **kw):
    base = dict(model=str(tiny["dropout"]), sources=[str(tiny["data"])], batch_size=8, steps=6, lr=5e-3,
                reduction_factor=4, eval_before=False, eval_after=False, progress=False, output_dir=str(out),
                max_query_length=16, max_passage_length=24, warmup=1)
    base.update(kw)
    return TrainConfig(**base)


def _interrupt_at(step):
    def on_step(rec):
        if rec.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the loop finishes the step and saves

    return on_step


@pytest.mark.parametrize("adapters", ["seq_bn", "none"])
def test_interrupted_and_resumed_run_gives_the_same_losses(tiny, tmp_path, adapters):
    # dropout 0.1 and a hybrid sampler: exact equality needs the RNG, sampler, optimizer and schedule back
    full = run(_cfg(tiny, tmp_path / "full", adapters=adapters))
    assert full["exit_code"] == 0
    part = run(_cfg(tiny, tmp_path / "part", adapters=adapters), on_step=_interrupt_at(3))
    assert part["exit_code"] == 130 and part["training"]["steps_done"] == 3
    assert checkpoint_path(tmp_path / "part").is_file()
    resumed = run(_cfg(tiny, tmp_path / "part", adapters=adapters, resume=True))
    assert resumed["exit_code"] == 0 and resumed["training"]["steps_done"] == 6
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    assert [x for _, x in a] == [x for _, x in b]  # bit-for-bit
    assert len({round(x, 6) for _, x in a}) > 1  # the loss moved: the comparison means something


def test_adapter_checkpoint_holds_only_adapter_weights(tiny, tmp_path):
    from effir import load_adapters, load_encoder

    out = tmp_path / "run"
    run(_cfg(tiny, out, steps=2))
    state = load_checkpoint(out)
    assert state["weights"] and all("effir_adapters" in k for k in state["weights"])
    for key in ("optimizer", "scheduler", "scaler", "sampler", "rng", "step"):
        assert key in state
    assert state["step"] == 2 and state["sampler"]["position"] == 2
    assert not list(out.glob("checkpoint/*.tmp"))  # the atomic write left no temporary file
    # the final adapters reload into a fresh encoder and give the trained embeddings
    enc = load_encoder(str(tiny["dropout"]))
    name = load_adapters(enc.model, out / "adapters")
    assert name
    params = dict(enc.model.named_parameters())
    for k, v in state["weights"].items():
        torch.testing.assert_close(params[k.removeprefix("model.")].detach(), v, rtol=0, atol=0)
    assert not (out / "model").exists()


def test_full_finetune_saves_a_loadable_model(tiny, tmp_path):
    from effir import load_encoder

    out = tmp_path / "run"
    metrics = run(_cfg(tiny, out, steps=2, adapters="none", lr=1e-4))
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]
    enc = load_encoder(str(out / "model"))
    e = enc.encode_queries(["alpha beta"])
    assert e.shape == (1, 32) and torch.isfinite(e).all()


@pytest.mark.parametrize("mini_batch_size", [None, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tiny, tmp_path, precision, mini_batch_size):
    # with GradCache the re-embedding runs under the step's autocast and its backward outside it
    metrics = run(_cfg(tiny, tmp_path / precision, steps=3, precision=precision, mini_batch_size=mini_batch_size))
    assert metrics["precision"] == precision
    assert all(torch.isfinite(torch.tensor(x)) for _, x in losses(tmp_path / precision))
    state = load_checkpoint(tmp_path / precision)
    assert state["scaler"] == {} if precision == "bf16" else state["scaler"]["scale"] > 0  # scaler only for fp16


def test_gradient_checkpointing_and_learnable_temperature(tiny, tmp_path):
    kw = dict(model=str(tiny["nodrop"]), steps=3, learnable_temperature=True)
    plain = run(_cfg(tiny, tmp_path / "plain", **kw))
    ckpt = run(_cfg(tiny, tmp_path / "ckpt", gradient_checkpointing=True, **kw))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    torch.testing.assert_close(torch.tensor([x for _, x in a]), torch.tensor([x for _, x in b]),
                               rtol=1e-5, atol=1e-6)
    state = load_checkpoint(tmp_path / "plain")
    assert "log_temperature" in state["loss"]
    assert float(state["loss"]["log_temperature"].exp()) != pytest.approx(0.05, abs=1e-7)  # it trained
    assert plain["exit_code"] == ckpt["exit_code"] == 0


@pytest.mark.parametrize("args, match", [
    (["--model", "no-such-model-xyz"], "--model"),
    (["--languages", "fr"], "--languages: no training data for \\['fr'\\]"),
    (["--batch-size", "128"], "--batch-size 128 is larger than the data"),
    (["--output-dir", "/proc/effir-cannot-write"], "--output-dir: cannot write"),
    (["--sources", "/nonexistent/groups.jsonl"], "sources"),
])
def test_bad_input_fails_before_training(tiny, tmp_path, capsys, args, match):
    argv = ["--model", str(tiny["dropout"]), "--sources", str(tiny["data"]), "--batch-size", "8",
            "--steps", "2", "--no-eval", "--no-progress", "--output-dir", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(match, err), err
    assert not checkpoint_path(tmp_path / "out").exists()  # nothing trained


@pytest.mark.data
def test_cli_before_after_evaluation_round_trip(tiny, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("EFFIR_CACHE", str(tmp_path / "cache"))
    argv = ["--model", str(tiny["nodrop"]), "--sources", str(tiny["data"]), "--batch-size", "8", "--steps", "2",
            "--eval-sets", "xquad-r", "--eval-max-paragraphs", "2", "--no-progress",
            "--max-query-length", "16", "--max-passage-length", "24"]
    assert main(argv + ["--output-dir", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "XQuAD-R" in printed and "before" in printed and "after" in printed and "Mul." in printed
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for when in ("before", "after"):
        r = m[when]["xquad-r"]
        assert r["dataset"] == "xquad-r" and set(r["map"]) >= {"mo", "cr", "mul"} and "rank_distance" in r
        assert r["matrix"] and r["max_paragraphs"] == 2
    assert m["training"]["steps_done"] == 2 and m["training"]["examples_per_s"] > 0
    assert m["config"]["batch_size"] == 8
    assert not m["before"]["xquad-r"].get("cached")
    # a re-run of the same base encoder and subset takes "before" from the cache
    assert main(argv + ["--output-dir", str(tmp_path / "b")]) == 0
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m2["before"]["xquad-r"]["cached"] is True
    assert m2["before"]["xquad-r"]["map"] == m["before"]["xquad-r"]["map"]


def test_training_starts_from_a_saved_adapterhub_adapter(tiny, tmp_path):
    """--init-adapters: an adapter in AdapterHub's format (a double_seq_bn, while --adapters keeps its seq_bn
    default) is what trains: the first loss differs from the identity-initialised run's, the saved result is a
    double_seq_bn, and it starts from the loaded weights."""
    from effir import add_adapters, load_adapters, load_encoder, save_adapters
    from effir.adapters import find_adapter_sites

    enc = load_encoder(str(tiny["nodrop"]))
    add_adapters(enc.model, "double_seq_bn", "hub", reduction_factor=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "effir_adapters.hub." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    start = {n: p.detach().clone() for n, p in enc.model.named_parameters() if "effir_adapters" in n}
    save_adapters(enc.model, tmp_path / "hub", format="adapterhub")

    fresh = run(_cfg(tiny, tmp_path / "fresh", model=str(tiny["nodrop"]), reduction_factor=None, steps=2))
    init = run(_cfg(tiny, tmp_path / "init", model=str(tiny["nodrop"]), reduction_factor=None, steps=2,
                    init_adapters=str(tmp_path / "hub")))
    assert init["exit_code"] == 0 and init["parameters"]["trainable"] == sum(t.numel() for t in start.values())
    assert losses(tmp_path / "init")[0][1] != losses(tmp_path / "fresh")[0][1]
    saved = json.loads((tmp_path / "init" / "adapters" / "adapter_config.json").read_text())
    cfg = saved["config"]
    assert saved["name"] == "hub" and cfg["mh_adapter"] and cfg["non_linearity"] == "swish"
    assert cfg["reduction_factor"] == 4
    trained = load_encoder(str(tiny["nodrop"]))
    load_adapters(trained.model, tmp_path / "init" / "adapters")
    params = dict(trained.model.named_parameters())
    moved = [float((params[n] - t).abs().max()) for n, t in start.items()]
    assert len(find_adapter_sites(trained.model)) == 4 and 0 < max(moved) < 0.1  # trained from there, a little


def test_grad_cache_run_matches_the_whole_batch_run_and_resumes_exactly(tiny, tmp_path):
    """--mini-batch-size (GradCache): the same optimisation as the whole-batch step (no dropout: up to float
    rounding), the encoder never sees more than N texts at once, and with dropout an interrupted and resumed
    run reproduces the uninterrupted one bit for bit."""
    from effir import grad_cache

    nodrop = str(tiny["nodrop"])
    whole = run(_cfg(tiny, tmp_path / "whole", model=nodrop))
    widths = []
    split = grad_cache.split_rows

    def spy(features, n, max_tokens=None):
        chunks = split(features, n, max_tokens)
        widths.extend(c["input_ids"].shape[0] for c in chunks)
        return chunks

    grad_cache.split_rows = spy
    try:
        cached = run(_cfg(tiny, tmp_path / "cached", model=nodrop, mini_batch_size=3))
    finally:
        grad_cache.split_rows = split
    assert whole["exit_code"] == cached["exit_code"] == 0
    assert max(widths) == 3 and sum(widths) == 6 * 2 * 8  # 6 steps x (queries + passages) x 8 texts
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cached")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=1e-5), (a, b)
    assert len({round(x, 4) for _, x in a}) > 1

    full = run(_cfg(tiny, tmp_path / "full", mini_batch_size=3))  # dropout 0.1
    part = run(_cfg(tiny, tmp_path / "part", mini_batch_size=3), on_step=_interrupt_at(3))
    assert part["exit_code"] == 130
    resumed = run(_cfg(tiny, tmp_path / "part", mini_batch_size=3, resume=True))
    assert resumed["exit_code"] == 0
    assert [x for _, x in losses(tmp_path / "full")] == [x for _, x in losses(tmp_path / "part")]


def test_hard_negatives_in_training(tiny, tmp_path):
    """--hard-negatives K: K more passages per pair in every step's loss (the synthetic groups have no paragraph
    negatives, so random same-language passages fill them); with GradCache the same losses."""
    from effir.training.metrics_log import read_jsonl

    nodrop = str(tiny["nodrop"])
    plain = run(_cfg(tiny, tmp_path / "plain", model=nodrop, steps=3))
    hard = run(_cfg(tiny, tmp_path / "hard", model=nodrop, steps=3, hard_negatives=2))
    cached = run(_cfg(tiny, tmp_path / "cached", model=nodrop, steps=3, hard_negatives=2, mini_batch_size=3))
    assert plain["exit_code"] == hard["exit_code"] == cached["exit_code"] == 0
    a, b, c = (losses(tmp_path / x) for x in ("plain", "hard", "cached"))
    assert b[0][1] > a[0][1]  # step 1, same weights: 16 more candidates in every row's log-sum-exp
    for (_, x), (_, y) in zip(b, c):
        assert y == pytest.approx(x, rel=1e-5), (b, c)
    tok = [[r["tokens"] for r in read_jsonl(tmp_path / x / "train_log.jsonl") if r["event"] == "step"]
           for x in ("plain", "hard")]
    assert all(h > p for p, h in zip(*tok))  # the negatives were encoded
