"""HybridBatchSampler invariants over many seeds, DDP rank slices, exact resume, and collate's group ids."""
import math
import random
from collections import Counter

import pytest
import torch

import effir
from effir.data.batching import HardNegatives, collate
from effir.data.groups import ParallelGroup
from effir.data.sampler import Batch, BatchItem, HybridBatchSampler

LANGS = ["ar", "de", "en", "es", "hi", "ru", "th", "tr", "zh"]


def make_groups(seed, n=157, p_multi=0.4):
    """Random groups: one-language groups, parallel groups of 2-5 languages, some cross-only (mono=False)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = rnd.choice([2, 3, 4, 5]) if rnd.random() < p_multi else 1
        langs = rnd.sample(LANGS, k)
        items = {lang: (f"q{i}-{lang}", f"p{i}-{lang}") for lang in langs}
        out.append(ParallelGroup(f"g{i}", "synthetic", items, mono=not (k > 1 and rnd.random() < 0.2)))
    return out


def check_batch(groups, batch: Batch, batch_size, languages=None):
    assert len(batch.global_items) == batch_size
    idx = [it.group_index for it in batch.global_items]
    assert len(set(idx)) == len(idx), "a group twice in one batch"
    for it in batch.global_items:
        g = groups[it.group_index]
        assert it.query_lang in g.items and it.passage_lang in g.items
        if languages:
            assert it.query_lang in languages and it.passage_lang in languages
        if batch.mode == "mono":
            assert it.query_lang == it.passage_lang == batch.language and g.mono
        else:
            assert batch.mode == "cross" and batch.language is None
            assert it.query_lang != it.passage_lang and len(g.items) >= 2


@pytest.mark.parametrize("mode", ["mono", "cross", "hybrid"])
def test_invariants_over_seeds(mode):
    for seed in range(25):
        groups = make_groups(seed)
        B = [4, 7, 8][seed % 3]
        langs = None if seed % 2 else ["en", "de", "zh", "ar", "th", "es"]
        s = HybridBatchSampler(groups, B, mode=mode, seed=seed, languages=langs)
        batches = list(s)
        assert len(batches) == len(s) == s.num_usable_groups // B > 0
        for b in batches:
            check_batch(groups, b, B, langs)
            assert b.items == b.global_items and len(b) == B
            if mode != "hybrid":
                assert b.mode == mode
        st = s.stats()
        assert st["batches"] == len(batches) and sum(st["pairs"].values()) == len(batches) * B
        assert sum(st["mono_per_language"].values()) == st["per_mode"].get("mono", 0)


def test_mono_only_groups_never_in_cross_batches():
    groups = make_groups(3, n=300)
    s = HybridBatchSampler(groups, 6, mode="hybrid", seed=1)
    for _ in range(3):
        for b in s:
            if b.mode == "cross":
                assert all(len(groups[it.group_index].items) >= 2 for it in b.items)
            else:
                assert all(groups[it.group_index].mono for it in b.items)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8])
def test_alpha_binomial(alpha):
    groups = make_groups(0, n=400, p_multi=0.5)
    s = HybridBatchSampler(groups, 5, mode="hybrid", alpha=alpha, seed=11)
    modes = [b.mode for _ in range(25) for b in s]
    n, k = len(modes), modes.count("mono")
    assert n > 1500
    assert abs(k - n * alpha) <= 4 * math.sqrt(n * alpha * (1 - alpha)), (k, n)
    assert s.stats()["per_mode"] == {"mono": k, "cross": n - k}
    assert [b.mode for b in HybridBatchSampler(groups, 5, alpha=0.0)] == ["cross"] * len(HybridBatchSampler(groups, 5, alpha=0.0))
    assert {b.mode for b in HybridBatchSampler(groups, 5, alpha=1.0)} == {"mono"}


def test_cross_pairs_uniform_over_ordered_pairs():
    groups = [ParallelGroup(f"g{i}", "s", {lang: ("q", f"p{i}{lang}") for lang in ("en", "de", "zh")}) for i in range(90)]
    s = HybridBatchSampler(groups, 9, mode="cross", seed=5)
    pairs = Counter((it.query_lang, it.passage_lang) for _ in range(40) for b in s for it in b.items)
    n = sum(pairs.values())
    assert len(pairs) == 6
    for c in pairs.values():  # each of the 6 ordered pairs ~ Binomial(n, 1/6)
        assert abs(c - n / 6) <= 4 * math.sqrt(n * (1 / 6) * (5 / 6))


def test_language_weights():
    # en has 3x the groups of de; th too few for a batch of 8: never a mono language, reported.
    groups = [ParallelGroup(f"e{i}", "s", {"en": ("q", "p")}) for i in range(120)]
    groups += [ParallelGroup(f"d{i}", "s", {"de": ("q", "p")}) for i in range(40)]
    groups += [ParallelGroup(f"t{i}", "s", {"th": ("q", "p")}) for i in range(5)]
    for weights, p_en in (("uniform", 0.5), ("size", 0.75), ({"en": 1, "de": 9}, 0.1)):
        s = HybridBatchSampler(groups, 8, mode="mono", language_weights=weights, seed=2)
        langs = [b.language for _ in range(60) for b in s]
        n, k = len(langs), langs.count("en")
        assert abs(k - n * p_en) <= 4 * math.sqrt(n * p_en * (1 - p_en)), (weights, k, n)
        assert set(langs) == {"en", "de"}
        assert s.stats()["languages_without_mono_batches"] == {"th": 5}


def test_epoch_is_a_permutation_for_a_single_pool():
    groups = [ParallelGroup(f"g{i}", "s", {"tr": ("q", f"p{i}")}) for i in range(60)]
    s = HybridBatchSampler(groups, 6, mode="mono", seed=9)
    e0 = [it.group_index for b in s for it in b.items]
    e1 = [it.group_index for b in s for it in b.items]
    assert sorted(e0) == sorted(e1) == list(range(60)) and e0 != e1
    assert s.epoch == 2


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_slices(world_size):
    groups = make_groups(7, n=250)
    B = 12
    ref = HybridBatchSampler(groups, B, seed=4)
    ranks = [HybridBatchSampler(groups, B, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(2):  # two epochs
        glob = list(ref)
        per_rank = [list(s) for s in ranks]
        assert all(len(p) == len(glob) for p in per_rank)
        for j, g in enumerate(glob):
            slices = [p[j].items for p in per_rank]
            assert all(len(sl) == B // world_size for sl in slices)
            assert sum(slices, ()) == g.items  # contiguous, disjoint, complete, same global batch
            assert all(p[j].mode == g.mode and p[j].global_items == g.items for p in per_rank)


def test_drop_last_false_and_ranks():
    groups = [ParallelGroup(f"g{i}", "s", {"en": ("q", f"p{i}"), "de": ("f", f"a{i}")}) for i in range(23)]
    s = HybridBatchSampler(groups, 6, mode="cross", drop_last=False)
    sizes = [len(b) for b in s]
    assert sizes == [6, 6, 6, 5] and len(s) == 4
    assert len(HybridBatchSampler(groups, 6, mode="cross")) == 3
    parts = [list(HybridBatchSampler(groups, 6, mode="cross", drop_last=False, rank=r, world_size=2)) for r in range(2)]
    assert [len(b) for b in parts[0]] == [3, 3, 3, 2] and [len(b) for b in parts[1]] == [3, 3, 3, 3]
    assert parts[0][-1].items + parts[1][-1].items == parts[0][-1].global_items


def stream(sampler, n):
    out = []
    while len(out) < n:
        for b in sampler:
            out.append((b.epoch, b.index, b.mode, b.items))
            if len(out) == n:
                break
    return out


def test_determinism_and_resume():
    groups = make_groups(1, n=200)
    full = stream(HybridBatchSampler(groups, 6, seed=3), 70)  # crosses an epoch boundary
    assert full == stream(HybridBatchSampler(groups, 6, seed=3), 70)
    assert full != stream(HybridBatchSampler(groups, 6, seed=4), 70)
    per_epoch = len(HybridBatchSampler(groups, 6, seed=3))
    for cut in (0, 1, 17, per_epoch - 1, per_epoch, per_epoch + 5):
        a = HybridBatchSampler(groups, 6, seed=3)
        head = stream(a, cut) if cut else []
        state = a.state_dict()
        b = HybridBatchSampler(groups, 6, seed=3)
        b.load_state_dict(state)
        assert head + stream(b, 70 - cut) == full, cut
        c = HybridBatchSampler(groups, 6, seed=3)
        c.load_state_dict(state)
        stream(c, 70 - cut)
        whole = HybridBatchSampler(groups, 6, seed=3)
        stream(whole, 70)
        assert c.stats() == whole.stats()
    other = HybridBatchSampler(groups, 8, seed=3)
    with pytest.raises(ValueError, match="config"):
        other.load_state_dict(state)


def test_set_epoch():
    groups = make_groups(2)
    a = HybridBatchSampler(groups, 5, seed=8)
    list(a)
    e1 = [b.items for b in a]
    b = HybridBatchSampler(groups, 5, seed=8)
    b.set_epoch(1)
    assert [x.items for x in b] == e1


def test_errors():
    groups = make_groups(0, n=40)
    mono_only = [ParallelGroup(f"g{i}", "s", {"en": ("q", "p")}) for i in range(20)]
    with pytest.raises(ValueError, match="mode"):
        HybridBatchSampler(groups, 4, mode="mixed")
    with pytest.raises(ValueError, match="alpha"):
        HybridBatchSampler(groups, 4, alpha=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        HybridBatchSampler(groups, 0)
    with pytest.raises(ValueError, match="multiple of world_size"):
        HybridBatchSampler(groups, 6, world_size=4, rank=1)
    with pytest.raises(ValueError, match="rank"):
        HybridBatchSampler(groups, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="ISO 639-1"):
        HybridBatchSampler(groups, 4, languages=["eng"])
    with pytest.raises(ValueError, match="two or more"):
        HybridBatchSampler(mono_only, 4, mode="cross")
    with pytest.raises(ValueError, match="two or more"):
        HybridBatchSampler(mono_only, 4, mode="hybrid")
    assert len(HybridBatchSampler(mono_only, 4, mode="hybrid", alpha=1.0)) == 5
    with pytest.raises(ValueError, match="monolingual-capable"):
        HybridBatchSampler(mono_only, 32, mode="mono")
    with pytest.raises(ValueError, match="language_weights"):
        HybridBatchSampler(groups, 4, language_weights="zipf")
    with pytest.raises(ValueError, match="empty"):
        HybridBatchSampler([], 4)


def test_collate_group_ids():
    # g0 and g1 share a passage text (two questions on one answer sentence): one id; g2 alone.
    groups = [ParallelGroup("a", "s", {"en": ("Q0", "same sentence."), "de": ("F0", "Satz.")}),
              ParallelGroup("b", "s", {"en": ("Q1", "same sentence.")}),
              ParallelGroup("c", "s", {"en": ("Q2", "other."), "de": ("F2", "andere.")}),
              ParallelGroup("d", "s", {"en": ("Q3", "fourth.")})]
    s = HybridBatchSampler(groups, 4, mode="mono", languages=["en"])
    batch = next(iter(s))
    q, p, ids = collate(groups, batch, query_prefix="query: ", passage_prefix="passage: ")
    assert ids.dtype == torch.long and ids.shape == (4,)
    by_group = {it.group_index: int(i) for it, i in zip(batch.items, ids)}
    assert by_group == {0: 0, 1: 0, 2: 2, 3: 3}
    k = [it.group_index for it in batch.items].index(2)
    assert q[k] == "query: Q2" and p[k] == "passage: other."


def test_collate_ids_agree_across_ranks():
    groups = make_groups(5, n=200)
    for g in groups[:50]:  # duplicate passage texts across groups
        for lang, (q, _) in list(g.items.items()):
            g.items[lang] = (q, "shared passage")
    glob = HybridBatchSampler(groups, 8, seed=6)
    ranks = [HybridBatchSampler(groups, 8, seed=6, rank=r, world_size=4) for r in range(4)]
    for b, *parts in zip(glob, *ranks):
        q, p, ids = collate(groups, b)
        pieces = [collate(groups, x) for x in parts]
        assert sum((x[0] for x in pieces), []) == q and sum((x[1] for x in pieces), []) == p
        assert torch.equal(torch.cat([x[2] for x in pieces]), ids)
        # Groups are distinct in a batch and questions unique here, so ids tie exactly the shared passages.
        for i in range(len(ids)):
            for j in range(len(ids)):
                assert bool(ids[i] == ids[j]) == (p[i] == p[j])


def test_hard_negatives_own_first_then_filled_and_masked_right():
    # g0 has two own negatives, one of them g1's positive text (a duplicate: masked for g1's query only);
    # g2 has none (filled from other English groups); g3's single negative plus one filler
    groups = [ParallelGroup("g0", "s", {"en": ("Q0", "P0.")}, negatives={"en": ("P1.", "N0.")}),
              ParallelGroup("g1", "s", {"en": ("Q1", "P1.")}),
              ParallelGroup("g2", "s", {"en": ("Q2", "P2."), "de": ("F2", "A2.")}),
              ParallelGroup("g3", "s", {"en": ("Q3", "P3.")}, negatives={"en": ("N3.",)})]
    groups += [ParallelGroup(f"o{i}", "s", {"en": (f"QO{i}", f"PO{i}.")}) for i in range(20)]
    batch = Batch("mono", tuple(BatchItem(i, "en", "en") for i in range(4)), tuple(BatchItem(i, "en", "en")
                                                                                   for i in range(4)), "en", 0, 5)
    hn = HardNegatives(groups, 2)
    texts, ids = hn(batch)
    assert len(texts) == ids.shape[0] == 8 and ids.dtype == torch.long
    by_item = [list(zip(texts[2 * i:2 * i + 2], ids[2 * i:2 * i + 2].tolist())) for i in range(4)]
    assert sorted(by_item[0]) == [("N0.", -2), ("P1.", 1)] or sorted(by_item[0]) == [("N0.", -1), ("P1.", 1)]
    assert {t for t, _ in by_item[2]} <= {f"PO{i}." for i in range(20)} | {"P0.", "P1.", "P3."}
    assert by_item[3][0] == ("N3.", -7)  # own negatives first; a unique id: -1 - (position 3 * k 2 + 0)
    for t, gid in by_item[2] + by_item[3][1:]:  # fillers from a group in the batch take its id, else unique
        in_batch = {"P0.": 0, "P1.": 1, "P3.": 3}
        assert gid == in_batch[t] if t in in_batch else gid < 0
    assert hn(batch)[0] == texts  # deterministic (resume draws the same)
    assert HardNegatives(groups, 2)(Batch("mono", batch.items, batch.global_items, "en", 1, 5))[0] != texts
    with pytest.raises(ValueError, match="k \\(hard negatives per item\\) must be a positive int"):
        HardNegatives(groups, 0)


def test_hard_negatives_agree_across_ranks():
    groups = make_groups(7, n=200)
    for i, g in enumerate(groups):
        g.negatives.update({lang: (f"n{i}-{lang}-a", f"n{i}-{lang}-b", p) for lang, (_, p) in g.items.items()})
    hn = HardNegatives(groups, 3)
    glob = HybridBatchSampler(groups, 8, seed=6)
    ranks = [HybridBatchSampler(groups, 8, seed=6, rank=r, world_size=2) for r in range(2)]
    for _, b, *parts in zip(range(20), glob, *ranks):
        texts, ids = hn(b)
        pieces = [hn(x) for x in parts]
        assert sum((x[0] for x in pieces), []) == texts
        assert torch.equal(torch.cat([x[1] for x in pieces]), ids)
        _, passages, pids = collate(groups, b)
        for t, gid in zip(texts, ids.tolist()):
            if t in passages:  # a negative equal to a positive of the batch is masked for that positive's query
                assert gid == int(pids[passages.index(t)])


def test_public_export():
    assert effir.HybridBatchSampler is HybridBatchSampler


@pytest.mark.data
def test_real_mix_one_epoch(data_dir):
    from effir.data.loaders import load_training_groups

    groups = load_training_groups()
    s = HybridBatchSampler(groups, 100, seed=0)
    n = 0
    for b in s:
        check_batch(groups, b, 100)
        n += 1
    st = s.stats()
    assert n == len(s) == 259 and set(st["mono_per_language"]) == {"ar", "en", "es", "hi", "th", "tr", "zh"}
    assert set(st["pairs"]) >= {"en->zh", "zh->en", "es->hi", "hi->es"}
