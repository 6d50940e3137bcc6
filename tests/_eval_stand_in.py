"""A deterministic stand-in encoder for the evaluation tests: hashed character 3-grams, L2-normalised.

It shares numbers and names across languages, so its LAReQA scores are well above chance, and it needs
no model download. Same interface as `effir.load_encoder()`'s Encoder.
"""
from __future__ import annotations

import zlib

import torch


class HashingEncoder:
    def __init__(self, dim: int = 257, name: str = "hashing-3gram", normalize: bool = True):
        self.dim = dim
        self.normalize = normalize
        self.name = name
        self.calls = {"queries": 0, "passages": 0}
        self.texts_seen = {"queries": 0, "passages": 0}

    def _encode(self, texts, kind):
        self.calls[kind] += 1
        self.texts_seen[kind] += len(texts)
        out = torch.zeros(len(texts), self.dim, dtype=torch.float64)
        for i, text in enumerate(texts):
            t = f" {text.lower()} "
            for j in range(len(t) - 2):
                out[i, zlib.crc32(t[j:j + 3].encode("utf-8")) % self.dim] += 1.0
        # normalize=False keeps integer counts: float32 dot products are then exact (tie tests)
        return (torch.nn.functional.normalize(out, dim=1) if self.normalize else out).float()

    def encode_queries(self, texts, batch_size=64, show_progress=None):
        return self._encode(list(texts), "queries")

    def encode_passages(self, texts, batch_size=64, show_progress=None):
        return self._encode(list(texts), "passages")
