"""`HybridBatchSampler`: batches that are X-X-mono, X-Y (cross-lingual) or a random mix of both (arXiv 2408.10536).

Pools. Mono pool of language L: the groups holding L (and `mono=True`). Cross pool: the groups with at
least two of the chosen languages. A mono language (or the cross pool) is usable only when its pool has at
least `batch_size` groups, so a batch never needs a group twice.

Epochs. One epoch is `len(sampler)` global batches, `len = U // batch_size` (`ceil` with drop_last=False,
the last batch then holding the remainder), where U is the number of distinct groups the mode can use.
At the start of epoch e every pool is shuffled with `numpy.random.default_rng([seed, e])`; batches draw
from their pool without replacement, and a pool that runs out is reshuffled and drawn again (recycled), the
groups already in the batch being pushed to the end of the new order. So in one epoch each group appears
about once per pool it belongs to, never twice in one batch, and small pools (rare languages under uniform
language weights) recycle sooner. The stream depends only on (groups, options, seed): `state_dict()` holds
(epoch, position), and `load_state_dict` resumes exactly at the next batch.

Batches. `batch_size` is the **global** batch size. With `world_size > 1` every rank builds the same global
batch and yields its own contiguous slice (`batch_size // world_size` items, so `batch_size` must be a
multiple of `world_size`; with drop_last=False the final short batch is split as evenly as possible).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from effir.data.groups import ISO_639_1, ParallelGroup

MODES = ("mono", "cross", "hybrid")


@dataclass(frozen=True)
class BatchItem:
    """One (query, passage) pair: group `group_index` (into the sampler's groups), in these languages."""

    group_index: int
    query_lang: str
    passage_lang: str


@dataclass(frozen=True)
class Batch:
    """A batch for this rank. `mode`: "mono" or "cross"; `language`: the mono language (None for cross);
    `items`: this rank's slice; `global_items`: the whole global batch (the same on every rank, so that
    `effir.data.batching.collate` gives every rank the same group ids); `epoch`, `index`: its position.
    """

    mode: str
    items: tuple[BatchItem, ...]
    global_items: tuple[BatchItem, ...]
    language: str | None
    epoch: int
    index: int

    def __len__(self) -> int:
        return len(self.items)


class _Pool:
    """Group indices drawn without replacement, reshuffled when exhausted."""

    def __init__(self, members: np.ndarray, rng: np.random.Generator):
        self.members, self.rng = members, rng
        self.order, self.pos = rng.permutation(members), 0

    def draw(self, k: int) -> list[int]:
        out = self.order[self.pos:self.pos + k].tolist()
        self.pos += len(out)
        if len(out) < k:
            taken = set(out)
            fresh = self.rng.permutation(self.members)
            # Groups already in this batch go last, so the batch stays duplicate-free.
            mask = np.fromiter((int(i) in taken for i in fresh), bool, len(fresh))
            self.order = np.concatenate([fresh[~mask], fresh[mask]])
            need = k - len(out)
            out += self.order[:need].tolist()
            self.pos = need
        return out


class HybridBatchSampler:
    """Batches of (group, query language, passage language) items; see the module docstring.

    groups: the `ParallelGroup`s (indices into this list identify them). batch_size: global batch size.
    mode: "mono" (X-X-mono: one language L for every query and passage), "cross" (X-Y: query language !=
    passage language for every pair, the pair drawn uniformly over the ordered pairs the group offers) or
    "hybrid" (mono with probability `alpha`, else cross). languages: ISO 639-1 codes to use (default: all
    in the groups). language_weights: how the mono language is drawn: "uniform", "size" (proportional to
    its pool) or a mapping language -> weight. seed, rank, world_size, drop_last: see the module docstring.
    """

    def __init__(self, groups: Sequence[ParallelGroup], batch_size: int, *, mode: str = "hybrid",
                 alpha: float = 0.5, languages: Sequence[str] | None = None,
                 language_weights: str | Mapping[str, float] = "uniform", seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, "
                             f"got rank={rank!r}, world_size={world_size!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}, global) must be a multiple of world_size ({world_size})")
        if len(groups) == 0:
            raise ValueError("groups must not be empty")
        self.groups = groups
        self.batch_size, self.mode, self.alpha = batch_size, mode, float(alpha)
        self.seed, self.rank, self.world_size, self.drop_last = int(seed), rank, world_size, drop_last
        present = sorted({lang for g in groups for lang in g.items})
        if languages is None:
            languages = present
        bad = [lang for lang in languages if lang not in ISO_639_1]
        if bad:
            raise ValueError(f"languages must be ISO 639-1 codes, got {bad}")
        self.languages = tuple(sorted(set(languages)))
        self._build_pools()
        self._weights = self._language_weights(language_weights)
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, list] | None = None
        self._reset_stats()

    # ------------------------------------------------------------------------------------------ setup

    def _build_pools(self) -> None:
        keep = set(self.languages)
        mono = {lang: [] for lang in self.languages}
        cross, cross_langs = [], {}
        for i, g in enumerate(self.groups):
            langs = sorted(keep.intersection(g.items))
            if g.mono:
                for lang in langs:
                    mono[lang].append(i)
            if len(langs) >= 2:
                cross.append(i)
                cross_langs[i] = langs
        B = self.batch_size
        self.mono_pools = {lang: np.array(ix, dtype=np.int64) for lang, ix in mono.items() if len(ix) >= B}
        self.cross_pool = np.array(cross, dtype=np.int64) if len(cross) >= B else np.zeros(0, np.int64)
        self._cross_langs = cross_langs
        small = {lang: len(ix) for lang, ix in mono.items() if 0 < len(ix) < B}
        if (self.mode == "mono" or (self.mode == "hybrid" and self.alpha > 0)) and not self.mono_pools:
            raise ValueError(
                f"mode={self.mode!r} needs a language with at least batch_size={B} monolingual-capable groups; "
                f"pool sizes {dict((k, len(v)) for k, v in mono.items())}")
        if self.mode in ("cross", "hybrid") and len(self.cross_pool) == 0 and (self.mode == "cross" or self.alpha < 1):
            raise ValueError(
                f"mode={self.mode!r} needs at least batch_size={B} groups with two or more of the languages "
                f"{list(self.languages)}; found {len(cross)} (use mode='mono' or a smaller batch_size)")
        self.skipped_languages = small  # languages with too few groups for a mono batch
        used = set()
        if self.mode == "mono" or (self.mode == "hybrid" and self.alpha > 0):
            for ix in self.mono_pools.values():
                used.update(ix.tolist())
        if self.mode == "cross" or (self.mode == "hybrid" and self.alpha < 1):
            used.update(self.cross_pool.tolist())
        self.num_usable_groups = len(used)

    def _language_weights(self, spec) -> np.ndarray:
        langs = sorted(self.mono_pools)
        if spec == "uniform":
            w = np.ones(len(langs))
        elif spec == "size":
            w = np.array([len(self.mono_pools[lang]) for lang in langs], dtype=np.float64)
        elif isinstance(spec, Mapping):
            w = np.array([float(spec.get(lang, 0.0)) for lang in langs])
            if (w < 0).any() or not np.isfinite(w).all() or (w.sum() <= 0 and self.mode != "cross"):
                raise ValueError(f"language_weights must be non-negative with a positive sum over {langs}, "
                                 f"got {dict(spec)}")
        else:
            raise ValueError(f"language_weights must be 'uniform', 'size' or a mapping, got {spec!r}")
        self._mono_langs = langs
        return w / w.sum() if w.sum() > 0 else w

    # ------------------------------------------------------------------------------------------- plan

    def __len__(self) -> int:
        """Global batches per epoch."""
        n = self.num_usable_groups
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def plan(self, epoch: int) -> list[tuple[str, str | None, list[BatchItem]]]:
        """Every global batch of `epoch` as (mode, mono language or None, items); deterministic."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        mono_pools = {lang: _Pool(self.mono_pools[lang], rng) for lang in self._mono_langs}
        cross_pool = _Pool(self.cross_pool, rng) if len(self.cross_pool) else None
        n, out = len(self), []
        for b in range(n):
            size = self.batch_size
            if b == n - 1 and not self.drop_last and self.num_usable_groups % self.batch_size:
                size = self.num_usable_groups % self.batch_size
            is_mono = self.mode == "mono" or (self.mode == "hybrid" and rng.random() < self.alpha)
            if is_mono:
                lang = self._mono_langs[int(rng.choice(len(self._mono_langs), p=self._weights))]
                items = [BatchItem(i, lang, lang) for i in mono_pools[lang].draw(size)]
                out.append(("mono", lang, items))
            else:
                idx = cross_pool.draw(size)
                q = rng.random(size)
                p = rng.random(size)
                items = []
                for i, uq, up in zip(idx, q, p):
                    langs = self._cross_langs[i]
                    k = len(langs)
                    qi = int(uq * k)
                    pi = int(up * (k - 1))
                    pi += pi >= qi  # uniform over the ordered pairs (qi, pi), pi != qi
                    items.append(BatchItem(i, langs[qi], langs[pi]))
                out.append(("cross", None, items))
        self._plan_cache = (epoch, out)
        return out

    def _rank_slice(self, items: list[BatchItem]) -> tuple[BatchItem, ...]:
        if len(items) % self.world_size == 0:
            k = len(items) // self.world_size
            return tuple(items[self.rank * k:(self.rank + 1) * k])
        bounds = np.linspace(0, len(items), self.world_size + 1).round().astype(int)  # the short last batch
        return tuple(items[bounds[self.rank]:bounds[self.rank + 1]])

    # -------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch from the saved position; afterwards the next epoch begins."""
        epoch = self.epoch
        plan = self.plan(epoch)
        while self.epoch == epoch and self.position < len(plan):
            index = self.position
            mode, lang, items = plan[index]
            batch = Batch(mode, self._rank_slice(items), tuple(items), lang, epoch, index)
            self.position += 1  # before yielding: a state_dict taken now resumes at the next batch
            self._count(batch)
            yield batch
        if self.epoch == epoch and self.position >= len(plan):
            self.epoch, self.position = epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (like DistributedSampler.set_epoch)."""
        self.epoch, self.position = int(epoch), 0

    # ------------------------------------------------------------------------------------ state/stats

    def _config(self) -> dict:
        return {"batch_size": self.batch_size, "mode": self.mode, "alpha": self.alpha,
                "languages": list(self.languages), "world_size": self.world_size, "drop_last": self.drop_last,
                "num_groups": len(self.groups), "weights": [round(float(w), 12) for w in self._weights]}

    def state_dict(self) -> dict:
        """Everything needed to resume at the next batch (small: counters, no group data)."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "config": self._config(),
                "stats": {"mode": dict(self._by_mode), "language": dict(self._by_lang),
                          "pairs": [[q, p, n] for (q, p), n in sorted(self._pairs.items())]}}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from `state_dict()`; ValueError when it was saved with other options or data."""
        if dict(state["config"]) != self._config():
            raise ValueError(f"state was saved by a sampler with config {state['config']}, "
                             f"this one has {self._config()}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        st = state["stats"]
        self._by_mode, self._by_lang = Counter(st["mode"]), Counter(st["language"])
        self._pairs = Counter({(q, p): n for q, p, n in st["pairs"]})

    def _reset_stats(self) -> None:
        self._by_mode, self._by_lang, self._pairs = Counter(), Counter(), Counter()

    def _count(self, batch: Batch) -> None:
        self._by_mode[batch.mode] += 1
        if batch.language is not None:
            self._by_lang[batch.language] += 1
        self._pairs.update((it.query_lang, it.passage_lang) for it in batch.items)

    def stats(self) -> dict:
        """What this rank has yielded: batches per mode, mono batches per language, and the
        (query language, passage language) histogram of its items ("en->zh": count)."""
        return {"batches": sum(self._by_mode.values()), "per_mode": dict(self._by_mode),
                "mono_per_language": dict(sorted(self._by_lang.items())),
                "pairs": {f"{q}->{p}": n for (q, p), n in sorted(self._pairs.items())},
                "epoch": self.epoch, "position": self.position, "batches_per_epoch": len(self),
                "languages_without_mono_batches": dict(self.skipped_languages)}
