"""Drop-in for sentence-transformers' `CachedMultipleNegativesRankingLoss` (GradCache) on effir's fused InfoNCE.

    from effir.losses import CachedMultipleNegativesRankingLoss   # instead of sentence_transformers.losses
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)   # SentenceTransformerTrainer(loss=loss)

Large batches with the memory of `mini_batch_size` texts (GradCache, Gao et al. 2021; `effir.grad_cache`): every
column of the batch is embedded `mini_batch_size` texts at a time without autograd; the fused loss takes the
whole batch in one call (the B x (B + B*n) score matrix is never materialised, where sentence-transformers loops
over row chunks of it) and its gradient with respect to the embeddings is kept; the trainer's `loss.backward()`
then re-embeds each chunk from its recorded RNG state (dropout draws the same masks) and backpropagates it. The
loss and gradients are MultipleNegativesRankingLoss's; arguments as there, plus `mini_batch_size`,
`mini_batch_num_tokens` (chunks by real-token budget instead of text count) and `show_progress_bar`. `symmetric=True` is sentence-transformers' `CachedMultipleNegativesSymmetricRankingLoss`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor, nn

from effir import grad_cache
from effir.losses.mnrl import MultipleNegativesRankingLoss


class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss computed with GradCache (module doc). mini_batch_size: texts embedded at a
    time (the memory bound); show_progress_bar: tqdm bars over the chunks of both passes."""

    uses_gradient_cache = True  # what sentence-transformers' wrappers (MatryoshkaLoss, ...) look for

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: str | Callable = "cos_sim",
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, directions: tuple[str, ...] = ("query_to_doc",),
                 partition_mode: str = "joint", show_progress_bar: bool = False, hardness_mode: str | None = None,
                 hardness_strength: float = 0.0, *, symmetric: bool = False, mask_same_label: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
                         hardness_mode, hardness_strength, symmetric=symmetric, mask_same_label=mask_same_label,
                         backend=backend)
        grad_cache.check_chunking(mini_batch_size, mini_batch_num_tokens,
                                  names=("mini_batch_size", "mini_batch_num_tokens"))
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = bool(show_progress_bar)

    def _embed(self, **features) -> Tensor:
        return self.model(features)["sentence_embedding"]

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss (a 0-dim leaf): its backward re-embeds the chunks and backpropagates into the model."""
        columns = list(sentence_features)
        device = next(v.device for v in columns[0].values() if isinstance(v, Tensor))
        # the trainer's backward (which runs the re-embedding) is outside its autocast: keep this forward's
        amp = grad_cache.current_autocast(device)
        cached = [grad_cache.embed_without_graph(self._embed, f, self.mini_batch_size, device,
                                                 max_tokens=self.mini_batch_num_tokens,
                                                 progress=self.show_progress_bar) for f in columns]
        embeddings = [c[0] for c in cached]
        with torch.enable_grad():
            loss = self.compute_loss_from_embeddings(embeddings, labels)
            grads = torch.autograd.grad(loss, embeddings)
        out = loss.detach().requires_grad_(True)
        # the caller's backward scales `out` (gradient accumulation, fp16 loss scaling): pass that factor on
        out.register_hook(lambda g: self._backward(cached, grads, g, amp))
        return out

    def _backward(self, cached, grads, grad_output: Tensor, amp) -> None:
        for (_, chunks, states), g in zip(cached, grads):
            grad_cache.backward_through_chunks(self._embed, chunks, states, g * grad_output, autocast=amp,
                                               progress=self.show_progress_bar)

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens}

    @property
    def citation(self) -> str:
        return """@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss: the cached loss with symmetric=True."""

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: str | Callable = "cos_sim",
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False, *,
                 mask_same_label: bool = False, backend: str = "auto"):
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens, gather_across_devices,
                         show_progress_bar=show_progress_bar, symmetric=True, mask_same_label=mask_same_label,
                         backend=backend)
