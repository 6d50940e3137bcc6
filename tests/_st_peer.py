"""Runs in the peers env (sentence-transformers 5.7): effir's MultipleNegativesRankingLoss vs sentence-transformers'
MultipleNegativesRankingLoss / MultipleNegativesSymmetricRankingLoss on the same float64 embeddings.

    python tests/_st_peer.py   -> "RESULT {json}" on stdout: per case, the loss of each and the largest gradient
                                  difference (abs) over anchors, positives and hard negatives; "model": the
                                  same through a tiny SentenceTransformer's forward (parameter gradients)
    python tests/_st_peer.py cached  -> "RESULT {json}": the GradCache losses of both libraries (dropout on)
    python tests/_st_peer.py compat  -> "RESULT {json}": 5.x directions/partition_mode; patch_sentence_transformers
    python tests/_st_peer.py trainer -> "RESULT {json}": SentenceTransformerTrainer runs with each library's loss
                                  on the same model, data and seed: per-step losses, final parameters, model card
Needs effir importable (PYTHONPATH=<repo>).
"""
from __future__ import annotations

import json
import warnings

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)


def main():
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses as st

    from effir.losses import MultipleNegativesRankingLoss

    out = {}
    for n_neg in (0, 2):
        for sim in ("cos_sim", "dot_score"):
            for symmetric in (False, True):
                for backend in ("reference", "chunked"):
                    g = torch.Generator().manual_seed(7 + n_neg)
                    embs = [torch.randn(7, 33, generator=g, dtype=torch.float64) for _ in range(2 + n_neg)]
                    fct = getattr(util, sim)
                    peer_cls = (st.MultipleNegativesSymmetricRankingLoss if symmetric
                                else st.MultipleNegativesRankingLoss)
                    peer = peer_cls(torch.nn.Identity(), scale=20.0, similarity_fct=fct)
                    ours = MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0, similarity_fct=fct,
                                                        symmetric=symmetric, backend=backend)
                    res = []
                    for loss in (peer, ours):
                        leaves = [e.clone().requires_grad_() for e in embs]
                        value = loss.compute_loss_from_embeddings(leaves, torch.zeros(7))
                        res.append((value.item(), torch.autograd.grad(value, leaves)))
                    grad_diff = max((a - b).abs().max().item() for a, b in zip(res[0][1], res[1][1]))
                    out[f"neg{n_neg}/{sim}/{'sym' if symmetric else 'fwd'}/{backend}"] = {
                        "peer": res[0][0], "effir": res[1][0], "grad_max_abs_diff": grad_diff,
                        "grad_max_abs": max(g_.abs().max().item() for g_ in res[0][1])}
    out["model"] = _through_a_model()
    print("RESULT " + json.dumps(out))


def _through_a_model() -> dict:
    """forward(sentence_features, labels) on a real (tiny, random-weight, float64) SentenceTransformer: anchors,
    positives and a hard-negative column tokenised by the model; loss and every parameter gradient."""
    from sentence_transformers.sentence_transformer import losses as st

    from effir.losses import MultipleNegativesRankingLoss

    model = _tiny_model().double()
    cols = [["the cat", "a big dog", "he sun", "it big car"], ["cat the", "dog big", "sun", "car it a"],
            ["a cat", "the the", "big sun", "it"]]
    prep = getattr(model, "preprocess", None) or model.tokenize
    feats = [prep(c) for c in cols]
    res = []
    for loss in (st.MultipleNegativesRankingLoss(model), MultipleNegativesRankingLoss(model, backend="reference")):
        model.zero_grad()
        value = loss([dict(f) for f in feats], torch.zeros(4))
        value.backward()
        res.append((value.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return {"peer": res[0][0], "effir": res[1][0], "n_grads": [len(res[0][1]), len(res[1][1])],
            "grad_max_abs_diff": max((a - b).abs().max().item() for a, b in zip(res[0][1], res[1][1])),
            "grad_max_abs": max(g.abs().max().item() for g in res[0][1])}


WORDS = "the cat dog sun car he it a big red old new sky sea".split()


def _tiny_model(seed=0, dropout=0.1):
    """A random-weight one-layer BERT SentenceTransformer (mean pooling) with a word-level vocabulary."""
    import os
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as stm
    from transformers import BertConfig, BertModel, BertTokenizerFast

    with tempfile.TemporaryDirectory() as d:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
        with open(os.path.join(d, "vocab.txt"), "w") as fh:
            fh.write("\n".join(words))
        BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt")).save_pretrained(d)
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                             attention_probs_dropout_prob=dropout)).save_pretrained(d)
        tr = stm.Transformer(d, max_seq_length=16)
        return SentenceTransformer(modules=[tr, stm.Pooling(tr.get_word_embedding_dimension())], device="cpu")


def trainer():
    """The drop-in where users put it: `SentenceTransformerTrainer(loss=...)`. Same float64 model, (anchor,
    positive, negative) dataset, seed and arguments; 4 AdamW steps with sentence-transformers' MNRL and MNSRL and
    with effir's (reference and chunked backends, and the GradCache drop-in). Returns the logged per-step losses, the largest parameter
    difference after training, and whether the saved model card names the loss."""
    import random
    import tempfile

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses as st

    from effir.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    rng = random.Random(0)
    sent = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))  # noqa: E731
    data = Dataset.from_dict({k: [sent() for _ in range(24)] for k in ("anchor", "positive", "negative")})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for symmetric in (False, True):
            runs = {}
            peer_cls = st.MultipleNegativesSymmetricRankingLoss if symmetric else st.MultipleNegativesRankingLoss
            cols = ["anchor", "positive"] if symmetric else ["anchor", "positive", "negative"]
            for who in ("peer", "reference", "chunked", "cached"):
                # no dropout: a whole batch and its GradCache chunks would draw different masks
                model = _tiny_model(dropout=0.0).double()
                if who == "peer":
                    loss = peer_cls(model)
                elif who == "cached":  # GradCache, 4 texts at a time: the same training
                    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, symmetric=symmetric,
                                                              backend="reference")
                else:
                    loss = MultipleNegativesRankingLoss(model, symmetric=symmetric, backend=who)
                args = SentenceTransformerTrainingArguments(
                    output_dir=f"{tmp}/{who}", max_steps=4, per_device_train_batch_size=6, learning_rate=1e-3,
                    warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
                    dataloader_drop_last=True, disable_tqdm=True)
                tr = SentenceTransformerTrainer(model=model, args=args, train_dataset=data.select_columns(cols),
                                                loss=loss)
                tr.train()
                model.save_pretrained(f"{tmp}/{who}/final")
                with open(f"{tmp}/{who}/final/README.md") as fh:
                    card = fh.read()
                runs[who] = {"losses": [r["loss"] for r in tr.state.log_history if "loss" in r],
                             "params": [p.detach().clone() for p in model.parameters()],
                             "card_names_loss": "MultipleNegatives" in card}
            start = [p.detach() for p in _tiny_model(dropout=0.0).double().parameters()]
            for who in ("reference", "chunked", "cached"):
                out[f"{'sym' if symmetric else 'fwd'}/{who}"] = {
                    "peer_losses": runs["peer"]["losses"], "effir_losses": runs[who]["losses"],
                    "param_max_abs_diff": max((a - b).abs().max().item()
                                              for a, b in zip(runs["peer"]["params"], runs[who]["params"])),
                    "param_max_moved": max((a - b).abs().max().item() for a, b in zip(runs["peer"]["params"], start)),
                    "card_names_loss": runs[who]["card_names_loss"]}
    return out


def cached() -> dict:
    """effir's CachedMultipleNegativesRankingLoss (reference backend) on the tiny float64 model, mini-batches of
    1, 3 and 16 texts, with a hard-negative column (MNRL) and symmetric (MNSRL); the caller's backward carries
    a factor 2.5 (as gradient accumulation or loss scaling do). Per case, loss and every parameter gradient:
    "exact": eval mode, against sentence-transformers' uncached MNRL / MNSRL (the same math: GradCache must not
    change it); "dropout": train mode (dropout 0.1), against sentence-transformers' Cached... losses from the
    same RNG state (same chunks, same masks in the first pass); "peer_cached_vs_uncached": how far
    sentence-transformers' own cached loss is from its uncached one in eval mode (for the record)."""
    from sentence_transformers.sentence_transformer import losses as st

    from effir.losses import CachedMultipleNegativesRankingLoss

    cols = [["the cat", "a big dog", "he sun", "it big car", "red sky", "old sea new"],
            ["cat the", "dog big", "sun", "car it a", "sky red red", "sea"],
            ["a cat", "the the", "big sun", "it", "new old", "sky sea sun the"]]

    def run(make, symmetric, train):
        model = _tiny_model().double().train(train)
        feats = [dict(model.preprocess(c)) for c in (cols[:2] if symmetric else cols)]
        loss = make(model)
        torch.manual_seed(11)  # the dropout masks start from the same state for every contestant
        value = loss(feats, torch.zeros(6))
        (2.5 * value).backward()
        return value.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def compare(a, b):
        return {"loss": [a[0], b[0]], "n_grads": [len(a[1]), len(b[1])],
                "grad_max_abs_diff": max((x - y).abs().max().item() for x, y in zip(a[1], b[1])),
                "grad_max_abs": max(g.abs().max().item() for g in a[1])}

    out = {}
    for symmetric in (False, True):
        name = "sym" if symmetric else "fwd"
        plain = st.MultipleNegativesSymmetricRankingLoss if symmetric else st.MultipleNegativesRankingLoss
        peer_cached = (st.CachedMultipleNegativesSymmetricRankingLoss if symmetric
                       else st.CachedMultipleNegativesRankingLoss)
        exact = run(lambda m: plain(m), symmetric, False)
        for mini in (1, 3, 16):
            ours = lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=mini, symmetric=symmetric,  # noqa: E731,B023
                                                                backend="reference")
            theirs = lambda m: peer_cached(m, mini_batch_size=mini)  # noqa: E731,B023
            out[f"exact/{name}/mini{mini}"] = compare(exact, run(ours, symmetric, False))
            out[f"dropout/{name}/mini{mini}"] = compare(run(theirs, symmetric, True), run(ours, symmetric, True))
        tokens = lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=4, mini_batch_num_tokens=9,  # noqa: E731
                                                              symmetric=symmetric, backend="reference")
        out[f"exact/{name}/tokens9"] = compare(exact, run(tokens, symmetric, False))
        out[f"peer_cached_vs_uncached/{name}"] = compare(exact, run(
            lambda m: peer_cached(m, mini_batch_size=3), symmetric, False))  # noqa: B023
    return out


def compat() -> dict:
    """sentence-transformers 5.x's spelling of the symmetric loss (directions + partition_mode) against the same
    arguments in sentence-transformers, float64 embeddings with a hard-negative column; and
    effir.patch_sentence_transformers(): after it the names a script reads from sentence_transformers.losses are
    effir's, built with sentence-transformers' arguments they give sentence-transformers' loss and gradients, and
    unpatching restores the originals."""
    import sentence_transformers.losses as st_losses
    from sentence_transformers import util

    import effir
    from effir.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(5)
    embs = [torch.randn(7, 33, generator=g, dtype=torch.float64) for _ in range(3)]

    def run(loss, n_cols=3):
        leaves = [e.clone().requires_grad_() for e in embs[:n_cols]]
        value = loss.compute_loss_from_embeddings(leaves, torch.zeros(7))
        return value.item(), torch.autograd.grad(value, leaves)

    def diff(a, b):
        return {"loss": [a[0], b[0]], "grad_max_abs_diff": max((x - y).abs().max().item() for x, y in zip(a[1], b[1])),
                "grad_max_abs": max(x.abs().max().item() for x in a[1])}

    sym = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    out = {"directions": diff(run(st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), **sym)),
                              run(MultipleNegativesRankingLoss(torch.nn.Identity(), backend="reference", **sym)))}
    originals = {n: getattr(st_losses, n) for n in ("MultipleNegativesRankingLoss",
                                                     "MultipleNegativesSymmetricRankingLoss")}
    patched = effir.patch_sentence_transformers()
    out["patched"] = patched
    out["is_effir"] = st_losses.MultipleNegativesRankingLoss is MultipleNegativesRankingLoss and \
        st_losses.CachedMultipleNegativesRankingLoss is CachedMultipleNegativesRankingLoss
    out["patched_mnrl"] = diff(run(originals["MultipleNegativesRankingLoss"](torch.nn.Identity(), scale=30.0,
                                                                              similarity_fct=util.dot_score)),
                               run(st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), scale=30.0,
                                                                          similarity_fct=util.dot_score)))
    out["patched_mnsrl"] = diff(run(originals["MultipleNegativesSymmetricRankingLoss"](torch.nn.Identity()), 2),
                                run(st_losses.MultipleNegativesSymmetricRankingLoss(torch.nn.Identity()), 2))
    try:
        st_losses.MultipleNegativesRankingLoss(torch.nn.Identity(), directions=("query_to_doc", "query_to_query"))
        out["refused"] = None
    except ValueError as exc:
        out["refused"] = str(exc)
    effir.unpatch_sentence_transformers()
    out["restored"] = all(getattr(st_losses, n) is c for n, c in originals.items())
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["trainer"]:
        print("RESULT " + json.dumps(trainer()))
    elif sys.argv[1:] == ["cached"]:
        print("RESULT " + json.dumps(cached()))
    elif sys.argv[1:] == ["compat"]:
        print("RESULT " + json.dumps(compat()))
    else:
        main()
