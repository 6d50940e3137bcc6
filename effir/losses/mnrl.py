"""Drop-in for sentence-transformers' `MultipleNegativesRankingLoss`, computed by effir's fused InfoNCE.

    from effir.losses import MultipleNegativesRankingLoss      # instead of sentence_transformers.losses
    loss = MultipleNegativesRankingLoss(model, scale=20.0)      # then SentenceTransformerTrainer(..., loss=loss)

Same constructor arguments, `forward(sentence_features, labels)` and `compute_loss_from_embeddings(embeddings,
labels)` as sentence-transformers 5.x (its default directions): column 0 of a batch is the anchors (queries),
column 1 their positives, columns 2.. hard negatives; every anchor competes against every positive and every
hard negative of the batch (B + B*n candidates, positives first), scores are `similarity_fct` x `scale`, and the
loss is the mean cross-entropy with target = the anchor's own positive. What changes is the cost: the B x
(B + B*n) score matrix is never materialised on the fused backends (`backend=`, see effir.backends), so the
batch size is bounded by the encoder, not by the loss.

Two options sentence-transformers' class has in other forms:
- `symmetric=True` also asks each positive to find its anchor among the batch's anchors and averages the two
  directions: sentence-transformers' `MultipleNegativesSymmetricRankingLoss`, and its 5.x spelling
  `directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`, which this class also takes.
  The other 5.x combinations (query_to_query / doc_to_doc terms, a joint softmax over two directions, hardness
  weighting) have no fused form: a ValueError names them.
- `mask_same_label=True` reads the batch's `labels` (B,) integer ids as groups: candidate j is left out of anchor
  i's softmax when j's label equals i's (j != i), so the translation of a positive in a multilingual parallel
  batch is not a negative (effir.info_nce's query_groups / doc_groups; no sentence-transformers loss does this).
  Hard negatives are never masked.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor, nn

from effir.ops.info_nce import info_nce

_SIMILARITIES = ("cos_sim", "dot_score")


def _similarity_name(similarity_fct: str | Callable) -> str:
    """"cos_sim" or "dot_score", from a name or from sentence-transformers' util function of that name."""
    name = similarity_fct if isinstance(similarity_fct, str) else getattr(similarity_fct, "__name__", "")
    if name not in _SIMILARITIES:
        raise ValueError(f"similarity_fct must be one of {', '.join(_SIMILARITIES)} (a name or "
                         f"sentence_transformers.util's function), got {similarity_fct!r}: other similarities "
                         "are not dot products of two embeddings and have no fused form")
    return name


def _symmetric_from_directions(directions, partition_mode: str) -> bool:
    """sentence-transformers 5.x's (directions, partition_mode) -> effir's symmetric flag; ValueError where effir
    has no fused form."""
    dirs = tuple(directions) if isinstance(directions, (list, tuple)) else (directions,)
    if set(dirs) == {"query_to_doc"}:
        return False  # one direction: "joint" and "per_direction" are the same softmax
    if set(dirs) == {"query_to_doc", "doc_to_query"} and partition_mode == "per_direction":
        return True
    raise ValueError(f"directions={dirs!r} with partition_mode={partition_mode!r} has no fused form in effir; "
                     "supported: ('query_to_doc',), and ('query_to_doc', 'doc_to_query') with "
                     "partition_mode='per_direction' (= symmetric=True)")


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives ranking loss of sentence-transformers on effir's fused InfoNCE (module doc).

    model: a SentenceTransformer, or any module mapping a feature dict to {"sentence_embedding": (B, d)}.
    scale: inverse temperature (20 = temperature 0.05). similarity_fct: "cos_sim" (embeddings normalised
    first) | "dot_score", or sentence_transformers.util.cos_sim / dot_score. gather_across_devices: anchors
    also compete against the other ranks' positives and negatives (effir.info_nce(gather=True)).
    backend: effir.info_nce's backend ("auto": the fastest for the device).
    """

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: str | Callable = "cos_sim",
                 gather_across_devices: bool = False, directions: tuple[str, ...] = ("query_to_doc",),
                 partition_mode: str = "joint", hardness_mode: str | None = None, hardness_strength: float = 0.0,
                 *, symmetric: bool = False, mask_same_label: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < float(scale) < float("inf"):
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = _similarity_name(similarity_fct)
        self.gather_across_devices = bool(gather_across_devices)
        self.symmetric = bool(symmetric) or _symmetric_from_directions(directions, partition_mode)
        if hardness_mode is not None and hardness_strength != 0.0:
            raise ValueError(f"hardness_mode={hardness_mode!r} (hardness_strength={hardness_strength}) has no fused "
                             "form in effir; use hardness_mode=None")
        self.mask_same_label = bool(mask_same_label)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """embeddings: [anchors (B, d), positives (B, d), negatives_1 (B, d), ...]; labels: (B,) integer group
        ids (read only with mask_same_label). Returns the scalar loss in float32 (float64 for float64 input)."""
        if len(embeddings) < 2:
            raise ValueError(f"embeddings must hold at least anchors and positives (2 tensors), got {len(embeddings)}")
        if self.similarity_fct == "cos_sim":
            embeddings = [nn.functional.normalize(e, p=2, dim=-1) for e in embeddings]
        q, p, *negs = embeddings
        negatives = torch.cat(negs) if negs else None
        groups = {}
        if self.mask_same_label:
            groups = self._groups(labels, q.shape[0], 0 if negatives is None else negatives.shape[0])
        return info_nce(q, p, negatives, temperature=1.0 / self.scale, symmetric=self.symmetric,
                        backend=self.backend, gather=self.gather_across_devices, **groups)

    @staticmethod
    def _groups(labels: Tensor | None, b: int, m: int) -> dict[str, Tensor]:
        """query_groups = labels; doc_groups = labels for the positives, then ids below every label for the hard
        negatives (one each: they are never masked)."""
        if labels is None or not isinstance(labels, Tensor) or labels.dtype.is_floating_point \
                or labels.dtype == torch.bool or tuple(labels.shape) != (b,):
            got = "None" if labels is None else f"{getattr(labels, 'dtype', type(labels))} " \
                f"{tuple(getattr(labels, 'shape', ()))}"
            raise ValueError(f"labels must be a ({b},) integer tensor of group ids when mask_same_label=True, "
                             f"got {got}")
        labels = labels.long()
        neg_ids = labels.min() - 1 - torch.arange(m, device=labels.device)
        return {"query_groups": labels, "doc_groups": torch.cat([labels, neg_ids])}

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into a model card."""
        return {"scale": self.scale, "similarity_fct": self.similarity_fct,
                "gather_across_devices": self.gather_across_devices,
                "directions": ("query_to_doc", "doc_to_query") if self.symmetric else ("query_to_doc",),
                "partition_mode": "per_direction" if self.symmetric else "joint", "symmetric": self.symmetric,
                "mask_same_label": self.mask_same_label, "backend": self.backend}

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return """@misc{henderson2017efficient,
    title={Efficient Natural Language Response Suggestion for Smart Reply},
    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and Ruiqi Guo
            and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year={2017},
    eprint={1705.00652},
    archivePrefix={arXiv},
    primaryClass={cs.CL}
}"""


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesSymmetricRankingLoss: MultipleNegativesRankingLoss(symmetric=True)."""

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: str | Callable = "cos_sim",
                 gather_across_devices: bool = False, *, mask_same_label: bool = False, backend: str = "auto"):
        super().__init__(model, scale, similarity_fct, gather_across_devices, symmetric=True,
                         mask_same_label=mask_same_label, backend=backend)
