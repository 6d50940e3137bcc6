"""Turn a sampler `Batch` into the encoder's inputs and the loss's group ids."""
from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from effir.data.groups import ParallelGroup
from effir.data.sampler import Batch


def collate(groups: Sequence[ParallelGroup], batch: Batch, *, query_prefix: str = "",
            passage_prefix: str = "") -> tuple[list[str], list[str], torch.Tensor]:
    """(queries, passages, group_ids) for this rank's items of `batch`.

    queries[i] / passages[i]: the question in item i's query language and the passage in its passage
    language, with the optional prefixes (E5 uses "query: " / "passage: ").
    group_ids: LongTensor [len(batch.items)], for the loss's `query_groups` and `doc_groups`: two items
    share an id when they come from the same group (translations) **or** have the same passage or query
    text (several questions often point at one answer sentence). Ids are computed on the global batch
    and are the smallest group index of each class, so they agree across ranks after an all-gather.
    """
    ids = _global_ids(groups, batch)
    queries, passages, out = [], [], []
    for it in batch.items:
        g = groups[it.group_index]
        queries.append(query_prefix + g.items[it.query_lang][0])
        passages.append(passage_prefix + g.items[it.passage_lang][1])
        out.append(ids[it.group_index])
    return queries, passages, torch.tensor(out, dtype=torch.long)


def _global_ids(groups: Sequence[ParallelGroup], batch: Batch) -> dict[int, int]:
    """{group index: group id} over the global batch (see `collate`)."""
    glob = batch.global_items
    parent = list(range(len(glob)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for j, it in enumerate(glob):
        g = groups[it.group_index]
        q, p = g.items[it.query_lang][0], g.items[it.passage_lang][1]
        for key in (("g", it.group_index), ("p", p.strip()), ("q", q.strip())):
            k = first.setdefault(key, j)
            if k != j:
                parent[find(j)] = find(k)
    root_id: dict[int, int] = {}
    for j, it in enumerate(glob):
        r = find(j)
        root_id[r] = min(root_id.get(r, it.group_index), it.group_index)
    # A group appears at most once in a batch, so its index identifies the item.
    ids = {it.group_index: root_id[find(j)] for j, it in enumerate(glob)}
    if len(ids) != len(glob):
        raise ValueError("batch must not hold a group twice (its translations would be false negatives)")
    return ids


class HardNegatives:
    """Exactly `k` extra negative passages per batch item, for the loss's `negatives` (M = k x batch items, the
    same on every rank, as the all-gather of `InfoNCELoss(gather=True)` needs).

    Item i's negatives, in its passage language: first its group's own hard negatives (`ParallelGroup.negatives`,
    e.g. the other sentences of the answer's paragraph), drawn without replacement; if it has fewer than k,
    passages of random other groups in that language fill up. The draw is seeded by (epoch, batch index,
    group), so a resumed run draws the same. Group ids keep false negatives out of the log-sum-exp: a negative
    whose text is a positive passage of the global batch, or that comes from a group in the global batch (a
    translation of its positive), takes that item's id; every other negative gets its own id (-1 - its
    position in the global batch's negatives), so it competes with every query.
    """

    def __init__(self, groups: Sequence[ParallelGroup], k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (hard negatives per item) must be a positive int, got {k!r}")
        self.groups, self.k = groups, k
        self._by_lang: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            for lang in g.items:
                self._by_lang.setdefault(lang, []).append(i)

    def __call__(self, batch: Batch, *, passage_prefix: str = "") -> tuple[list[str], torch.Tensor]:
        """(negatives: len(batch.items) * k passages, in item order; their doc group ids (LongTensor))."""
        ids = _global_ids(self.groups, batch)
        by_text = {}
        for it in batch.global_items:
            by_text.setdefault(self.groups[it.group_index].items[it.passage_lang][1].strip(), ids[it.group_index])
        position = {it.group_index: j for j, it in enumerate(batch.global_items)}
        texts, out = [], []
        for it in batch.items:
            rng = random.Random(f"{batch.epoch}:{batch.index}:{it.group_index}")
            lang = it.passage_lang
            own = list(self.groups[it.group_index].negatives.get(lang, ()))
            picked = [(t, None) for t in rng.sample(own, min(self.k, len(own)))]
            pool = self._by_lang[lang]
            while len(picked) < self.k and len(pool) > 1:
                h = pool[rng.randrange(len(pool))]
                if h != it.group_index:
                    picked.append((self.groups[h].items[lang][1], h))
            if len(picked) < self.k:
                gid = self.groups[it.group_index].group_id
                raise ValueError(f"hard negatives: language {lang!r} has a single group in the training data; "
                                 f"no other passage can fill the {self.k} negatives of {gid!r}")
            for n, (text, src) in enumerate(picked):
                gid = by_text.get(text.strip())
                if gid is None and src is not None and src in ids:
                    gid = ids[src]
                if gid is None:
                    gid = -1 - (position[it.group_index] * self.k + n)
                texts.append(passage_prefix + text)
                out.append(gid)
        return texts, torch.tensor(out, dtype=torch.long)
