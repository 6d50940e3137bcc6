"""Runs in the peers env (sentence-transformers 5.7): effir's MultipleNegativesRankingLoss vs sentence-transformers'
MultipleNegativesRankingLoss / MultipleNegativesSymmetricRankingLoss on the same float64 embeddings.

    python tests/_st_peer.py   -> "RESULT {json}" on stdout: per case, the loss of each and the largest gradient
                                  difference (abs) over anchors, positives and hard negatives; "model": the
                                  same through a tiny SentenceTransformer's forward (parameter gradients)
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
    import os
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as stm
    from sentence_transformers.sentence_transformer import losses as st
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from effir.losses import MultipleNegativesRankingLoss

    with tempfile.TemporaryDirectory() as d:
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the cat dog sun car he it a big".split()
        with open(os.path.join(d, "vocab.txt"), "w") as fh:
            fh.write("\n".join(words))
        BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt")).save_pretrained(d)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32)).save_pretrained(d)
        tr = stm.Transformer(d, max_seq_length=16)
        model = SentenceTransformer(modules=[tr, stm.Pooling(tr.get_word_embedding_dimension())], device="cpu")
    model = model.double()
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


if __name__ == "__main__":
    main()
