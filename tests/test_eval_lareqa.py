"""XQuAD-R / MLQA-R loaders on the real files: counts as in LAReQA's table, relevant sets, subsets."""
import collections

import pytest
import torch

from effir.evaluation.evaluate import compute_metrics
from effir.evaluation.lareqa import DATASETS, load_lareqa

# LAReQA README (questions, candidates) per language
XQUAD = {"ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244, "ru": 1219, "th": 852,
         "tr": 1167, "vi": 1209, "zh": 1196}
MLQA = {"ar": (517, 2545), "de": (512, 2362), "en": (1148, 6264), "es": (500, 1787), "hi": (507, 2426),
        "vi": (511, 2828), "zh": (504, 2322)}


@pytest.fixture(scope="module")
def xquad(data_dir):
    return load_lareqa("xquad-r")


@pytest.fixture(scope="module")
def mlqa(data_dir):
    return load_lareqa("mlqa-r")


def _check_relevant(data):
    for qid, per_lang in data.answers.items():
        for lang, c in per_lang.items():
            assert data.languages[data.cand_lang[c]] == lang
    # the answer text starts inside its sentence (the few answers crossing a break start there)
    i = data.q_id.index(next(iter(data.answers)))
    assert data.cand_text[data.answers[data.q_id[i]][data.languages[data.q_lang[i]]]]


def test_xquad_counts(xquad):
    assert xquad.languages == tuple(XQUAD)
    assert len(xquad.cand_text) == sum(XQUAD.values()) == 13014
    for lang, n in XQUAD.items():
        assert len(xquad.questions_in(lang)) == 1190
        assert len(xquad.candidates_in(lang)) == n
    assert len(xquad.answers) == 1190 and xquad.n_groups == 240
    # every question has its answer sentence in all 11 languages, one each
    assert all(sorted(a) == sorted(XQUAD) for a in xquad.answers.values())
    _check_relevant(xquad)


def test_mlqa_counts(mlqa):
    assert mlqa.languages == tuple(MLQA)
    for lang, (nq, nc) in MLQA.items():
        assert len(mlqa.questions_in(lang)) == nq
        assert len(mlqa.candidates_in(lang)) == nc
    assert len(mlqa.cand_text) == 20534
    sizes = collections.Counter(len(a) for a in mlqa.answers.values())
    assert sizes == {2: 65, 3: 263, 4: 820}  # MLQA questions exist in 2 to 4 languages
    _check_relevant(mlqa)


def test_answer_sentence_holds_answer(xquad):
    import json

    from effir.evaluation.lareqa import _paths

    doc = json.loads(_paths("xquad-r")["en"].read_text(encoding="utf-8"))
    qa = doc["data"][0]["paragraphs"][0]["qas"][1]  # "How many career sacks did Jared Allen have?" -> 136
    c = xquad.answers[qa["id"]]["en"]
    assert qa["answers"][0]["text"] in xquad.cand_text[c]
    assert "Jared Allen" in xquad.cand_text[c]


def test_settings_counts(data_dir):
    g = torch.Generator().manual_seed(0)
    for name, n_lang in (("xquad-r", 11), ("mlqa-r", 7)):
        data = load_lareqa(name, max_paragraphs=0.1, seed=0)
        q = torch.randn(len(data.q_text), 8, generator=g)
        c = torch.randn(len(data.cand_text), 8, generator=g)
        r = compute_metrics(data, q, c, search="torch")
        assert r["n_pairs"] == {"mo": n_lang, "cr": n_lang * (n_lang - 1)}
        assert len(r["matrix"]) == n_lang and all(len(row) == n_lang for row in r["matrix"].values())
        assert 0 < r["map"]["mul"] < 1 and r["rank_distance"] > 0


def test_subset_keeps_parallel_structure(data_dir):
    for name in DATASETS:
        full = load_lareqa(name)
        a = load_lareqa(name, max_paragraphs=20, seed=3)
        b = load_lareqa(name, max_paragraphs=20, seed=3)
        assert a.n_groups == 20 and a.cand_text == b.cand_text and a.q_id == b.q_id
        assert load_lareqa(name, max_paragraphs=20, seed=4).q_id != a.q_id
        # a kept question keeps its answer in every language the full set has
        for qid in a.answers:
            assert set(a.answers[qid]) == set(full.answers[qid])
        frac = load_lareqa(name, max_paragraphs=0.5, seed=0)
        assert frac.n_groups == round(0.5 * full.n_groups)


def test_options(data_dir):
    d = load_lareqa("xquad-r", languages=["zh", "en"], max_paragraphs=2)
    assert d.languages == ("en", "zh")  # canonical order
    ctx = load_lareqa("xquad-r", languages="en", max_paragraphs=2, candidate="sentence+context")
    plain = load_lareqa("xquad-r", languages="en", max_paragraphs=2)
    assert all(t.startswith(p + "\n") and len(t) > len(p) + 1 for t, p in zip(ctx.cand_text, plain.cand_text))
    for bad in (dict(dataset="squad"), dict(languages=["xx"]), dict(languages=[]), dict(max_paragraphs=0),
                dict(max_paragraphs=1.5), dict(max_paragraphs="10"), dict(candidate="paragraph")):
        with pytest.raises(ValueError):
            load_lareqa(**({"dataset": "xquad-r"} | bad))
