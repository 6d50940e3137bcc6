"""Runs in the peers env (sentence-transformers 5.7): effir's MultipleNegativesRankingLoss vs sentence-transformers'
MultipleNegativesRankingLoss / MultipleNegativesSymmetricRankingLoss on the same float64 embeddings.

    python tests/_st_peer.py   -> "RESULT {json}" on stdout: per case, the loss of each and the largest gradient
                                  difference (abs) over anchors, positives and hard negatives
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
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
