"""Turn a sampler `Batch` into the encoder's inputs and the loss's group ids."""
from __future__ import annotations

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
    queries, passages, out = [], [], []
    for it in batch.items:
        g = groups[it.group_index]
        queries.append(query_prefix + g.items[it.query_lang][0])
        passages.append(passage_prefix + g.items[it.passage_lang][1])
        out.append(ids[it.group_index])
    return queries, passages, torch.tensor(out, dtype=torch.long)
