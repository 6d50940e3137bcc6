"""GradCache (Gao et al. 2021, arXiv 2101.06983): a contrastive step over a batch of any size with the
activation memory of `mini_batch_size` texts, and the same gradients as the whole-batch step.

In-batch negatives tie every text of a batch to every other, so a batch cannot be cut into gradient-accumulation
pieces. GradCache cuts the encoder's work instead:
  1. `embed_without_graph`: embed the batch in chunks of `mini_batch_size` texts without autograd (no activations
     kept), recording each chunk's RNG state;
  2. the caller takes the loss on the (B, H) embeddings as leaves and backpropagates to them (the fused loss
     itself needs only O(B·H) memory);
  3. `backward_through_chunks`: re-embed each chunk with autograd from its recorded RNG state (dropout draws
     the same masks, so the embeddings are the ones the loss saw) and backpropagate the cached (chunk, H)
     gradient into the encoder, one chunk's activations alive at a time.
Cost: one extra forward pass of the encoder (about a third more compute than forward + backward).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

Features = dict[str, torch.Tensor]


class RngReplay:
    """The CPU RNG state and, on a GPU, `device`'s CUDA RNG state, taken at construction. `with replay:` runs its
    body from those states and afterwards puts the global RNG back where it was, so replaying does not change
    what later code draws."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._fork = None

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=[self.device] if self.cuda is not None else [])
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        return self

    def __exit__(self, *exc):
        fork, self._fork = self._fork, None
        return fork.__exit__(*exc)


def check_chunking(mini_batch_size, max_tokens=None, *, names=("mini_batch_size", "max_tokens")) -> None:
    """ValueError naming the argument unless mini_batch_size is a positive int and max_tokens one or None."""
    for name, value, optional in ((names[0], mini_batch_size, False), (names[1], max_tokens, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def split_rows(features: Features, mini_batch_size: int, max_tokens: int | None = None) -> list[Features]:
    """Cut tokenizer output ((B, T) tensors, usually with an "attention_mask") into chunks of at most
    `mini_batch_size` rows. With an attention mask, a chunk drops the trailing columns that are padding in all
    of its rows, so a chunk of short texts is embedded at its own width (the embeddings do not change: those
    positions are masked). Values that are not batch-first tensors pass to every chunk unchanged. max_tokens
    (needs the attention mask): chunks of consecutive rows holding at most that many real tokens instead (and
    at most mini_batch_size rows; a longer row is a chunk alone), so memory follows tokens rather than texts on
    mixed-length data."""
    check_chunking(mini_batch_size, max_tokens)
    mask = features.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        b, t = mask.shape
    else:  # no token grid to trim: the rows of the first batch-first tensor
        mask = None
        first = next((v for v in features.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is None:
            raise ValueError(f"features must hold batch-first tensors (tokenizer output), got keys {sorted(features)}")
        b, t = first.shape[0], -1
    if max_tokens is not None and mask is None:
        raise ValueError("max_tokens needs an 'attention_mask' in the features (it counts real tokens)")
    chunks = []
    for begin, end in _ranges(mask, b, mini_batch_size, max_tokens):
        used = mask[begin:end].any(dim=0).nonzero() if mask is not None else None
        width = int(used.max()) + 1 if used is not None and used.numel() else t
        chunks.append({k: _rows(v, begin, end, width, b, t) for k, v in features.items()})
    return chunks


def _ranges(mask, b: int, mini_batch_size: int, max_tokens: int | None) -> list[tuple[int, int]]:
    if max_tokens is None:
        return [(i, min(i + mini_batch_size, b)) for i in range(0, b, mini_batch_size)]
    lengths = mask.sum(dim=1).tolist()
    ranges, begin = [], 0
    while begin < b:
        end, tokens = begin + 1, lengths[begin]  # at least one row, however long
        while end < b and end - begin < mini_batch_size and tokens + lengths[end] <= max_tokens:
            tokens += lengths[end]
            end += 1
        ranges.append((begin, end))
        begin = end
    return ranges


def _rows(v, begin: int, end: int, width: int, b: int, t: int):
    """Rows begin:end of a batch-first (B, ...) tensor, (B, T) ones cut to `width` columns; anything else (a
    prompt length, a task name, a 0-dim tensor) belongs to the whole batch and passes unchanged."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != b:
        return v
    return v[begin:end, :width] if v.dim() == 2 and v.shape[1] == t else v[begin:end]


def _progress(chunks, desc: str, show: bool):
    if not show:
        return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc=desc, leave=False)


def embed_without_graph(encode: Callable[..., torch.Tensor], features: Features, mini_batch_size: int,
                        device: torch.device, *, max_tokens: int | None = None, progress: bool = False
                        ) -> tuple[torch.Tensor, list[Features], list[RngReplay]]:
    """Step 1. Returns (embeddings (B, H) as a leaf that requires grad, the chunks, their RNG states).
    `encode(**chunk)` -> (chunk, H); it runs under whatever autocast the caller holds. max_tokens: see
    `split_rows`; progress: a tqdm bar."""
    chunks = split_rows(features, mini_batch_size, max_tokens)
    states, parts = [], []
    with torch.no_grad():
        for chunk in _progress(chunks, "GradCache: embedding", progress):
            states.append(RngReplay(device))
            parts.append(encode(**chunk))
    return torch.cat(parts).requires_grad_(True), chunks, states


def backward_through_chunks(encode: Callable[..., torch.Tensor], chunks: list[Features], states: list[RngReplay],
                            grad: torch.Tensor, *,
                            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                            progress: bool = False) -> None:
    """Step 3. Re-embed every chunk from its RNG state with autograd and backpropagate its rows of `grad`
    ((B, H), the gradient of the loss with respect to step 1's embeddings) into the encoder's parameters.
    autocast: the context step 1 ran under (mixed precision), entered for each re-embedding only: the forward
    must repeat step 1's exactly, and a backward does not belong under autocast."""
    begin = 0
    for chunk, state in _progress(list(zip(chunks, states)), "GradCache: backward", progress):
        with state, torch.enable_grad(), autocast():
            emb = encode(**chunk)
        n = emb.shape[0]
        emb.backward(grad[begin:begin + n].to(emb.dtype))
        begin += n
    if begin != grad.shape[0]:
        raise ValueError(f"grad has {grad.shape[0]} rows, the chunks {begin}")


def dual_encoder_backward(encoder: Callable[..., torch.Tensor], loss_fn: Callable[..., torch.Tensor], q: Features,
                          p: Features, groups: torch.Tensor, mini_batch_size: int, device: torch.device, *,
                          negatives: Features | None = None, negative_groups: torch.Tensor | None = None,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> torch.Tensor:
    """One dual-encoder contrastive step's forward and backward as GradCache; returns the loss (detached).

    encoder(**features) -> (B, H) embeddings for queries `q`, passages `p` and optional hard `negatives`
    (tokenizer output, (B, T) / (M, T)); loss_fn(q_emb, p_emb, n_emb, query_groups=groups, doc_groups=groups
    [+ negative_groups]) -> scalar (e.g. effir.InfoNCELoss); autocast: a context for the encoder passes (mixed
    precision); scale: applied to the loss before backward (a GradScaler's `scale`). Parameter gradients are
    accumulated into .grad as loss.backward() would."""
    sides = [q, p] if negatives is None else [q, p, negatives]
    with autocast():
        cached = [embed_without_graph(encoder, f, mini_batch_size, device) for f in sides]
    embs = [c[0] for c in cached]
    doc_groups = groups if negatives is None else torch.cat([groups, negative_groups])
    loss = loss_fn(*embs, query_groups=groups, doc_groups=doc_groups)
    scale(loss).backward()  # to the embeddings (and the loss's own parameters, e.g. a learnable temperature)
    for emb, chunks, states in cached:
        backward_through_chunks(encoder, chunks, states, emb.grad, autocast=autocast)
    return loss.detach()


def current_autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context active now for `device` (enabled or not, its dtype): what a later
    re-embedding (in a backward hook, outside the caller's autocast) must run under to repeat this forward."""
    kind = device.type
    enabled = torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind)
    return lambda: torch.autocast(kind, dtype=dtype, enabled=enabled)
