"""`python -m effir.eval` end to end: a tiny random BERT saved as a Hugging Face model, a small subset."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    """A 2-layer, 32-wide random BertModel + a WordPiece tokenizer trained on a few LAReQA texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from effir.evaluation.lareqa import load_lareqa

    texts = load_lareqa("xquad-r", max_paragraphs=3, seed=0).cand_text
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def test_cli_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "res" / "xquad.json"
    cmd = [sys.executable, "-m", "effir.eval", "--model", str(tiny_model), "--dataset", "xquad-r",
           "--max-paragraphs", "3", "--output", str(out), "--batch-size", "16", "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("dataset", "model", "map", "recall", "rank_distance", "matrix", "n_questions", "n_candidates",
                "settings", "timing"):
        assert key in res
    assert res["dataset"] == "xquad-r" and res["settings"]["max_paragraphs"] == 3
    assert set(res["map"]) == {"mo", "cr", "mul"} and set(res["recall"]) == {"mo_r1", "cr_r1", "mul_r10"}
    assert len(res["matrix"]) == 11 and all(len(v) == 11 for v in res["matrix"].values())
    assert all(0.0 <= v <= 1.0 for v in [*res["map"].values(), *res["recall"].values()])
    assert res["n_candidates"] < 13014 and res["n_questions"] % 11 == 0
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Mo." in proc.stdout and "Mul." in proc.stdout and "mAP" in proc.stdout


def test_cli_fraction_and_no_plot(tiny_model, tmp_path):
    from effir.eval import main

    out = tmp_path / "m.json"
    res = main(["--model", str(tiny_model), "--dataset", "mlqa-r", "--max-paragraphs", "0.01", "--output",
                str(out), "--plot", "none", "--search", "torch", "--languages", "en,de,zh", "--quiet",
                "--no-matrix"])
    assert json.loads(out.read_text())["map"] == res["map"]
    assert not out.with_suffix(".png").exists()
    assert res["settings"]["languages"] == ["de", "en", "zh"] and res["settings"]["search"] == "torch"


def test_cli_bad_arguments(tmp_path):
    from effir.eval import main

    with pytest.raises(SystemExit):
        main(["--dataset", "squad", "--output", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        main(["--dataset", "xquad-r", "--output", str(tmp_path / "x.json"), "--max-paragraphs", "many"])


def test_evaluate_api_cache_and_errors(tmp_path, data_dir):
    from _eval_stand_in import HashingEncoder

    import effir
    from effir.evaluation import load_lareqa

    enc = HashingEncoder(dim=61)
    kw = dict(max_paragraphs=15, seed=2, search="torch")
    plain = effir.evaluate(enc, "mlqa-r", **kw)
    seen = dict(enc.texts_seen)
    # each distinct text is encoded once
    assert seen["passages"] == len(set(load_lareqa("mlqa-r", max_paragraphs=15, seed=2).cand_text))
    first = effir.evaluate(enc, "mlqa-r", cache=tmp_path / "c", output=tmp_path / "r.json", plot=True, **kw)
    again = effir.evaluate(enc, "mlqa-r", cache=tmp_path / "c", **kw)
    assert enc.texts_seen["passages"] == 2 * seen["passages"]  # the cached run encoded nothing
    assert plain["map"] == first["map"] == again["map"] and plain["matrix"] == again["matrix"]
    assert (tmp_path / "r.png").is_file() and json.loads((tmp_path / "r.json").read_text())["plot"].endswith(".png")
    with pytest.raises(ValueError, match="plot"):
        effir.evaluate(enc, "mlqa-r", plot=True, **kw)
    with pytest.raises(ValueError, match="encoder"):
        effir.evaluate(object(), "mlqa-r", **kw)
    with pytest.raises(ValueError, match="batch_size"):
        effir.evaluate(enc, "mlqa-r", batch_size=0, **kw)
    with pytest.raises(ValueError, match="dataset"):
        effir.evaluate(enc, "xquad", **kw)
