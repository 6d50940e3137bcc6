"""XQuAD-R and MLQA-R exactly as LAReQA (arXiv 2004.05484) defines them.

Each language file is SQuAD JSON whose paragraphs also carry `sentences` and `sentence_breaks`
(character spans into `context`). LAReQA turns span extraction into retrieval:

- candidates: every sentence of every paragraph of every language, as segmented in the files (no
  de-duplication: XQuAD-R has 13,014 candidates, MLQA-R 20,534, matching LAReQA's table);
- a question's answer sentence in a language: the sentence whose span holds the answer's first
  character (`answer_start`); the few answers that run over a sentence break count for the sentence
  they start in;
- relevant set: the answer sentence in every language that has the question id (11 for XQuAD-R;
  2 to 4 for MLQA-R, whose questions exist in a varying number of languages).

Candidate text (`candidate=`): "sentence" (default) encodes the sentence alone. LAReQA's mBERT and
mUSE-QA baselines fed the paragraph as a second input beside the sentence; an E5-style encoder has no
such slot, so "sentence+context" appends the paragraph after the sentence (newline-separated,
truncated by the encoder) for those who want that variant. The paper we follow (arXiv 2408.10536)
evaluates E5-style single-text encoders, so the sentence alone is our default.
"""
from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field

import numpy as np

from effir._validation import check_choice

DATASETS = {
    # name -> (lareqa commit, folder, languages in LAReQA's order)
    "xquad-r": ("9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c", "xquad-r",
                ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")),
    "mlqa-r": ("354d67d1cd066854cdfbf5ad0e6105528976141d", "mlqa-r", ("ar", "de", "en", "es", "hi", "vi", "zh")),
}
CANDIDATE_TEXTS = ("sentence", "sentence+context")


@dataclass
class LareqaData:
    """One LAReQA data set in memory. Candidate and question fields are parallel lists / int64 arrays.

    cand_text[c], cand_lang[c] (index into `languages`), cand_group[c]: the parallel paragraph group;
    q_id[i], q_text[i], q_lang[i]; answers[qid][lang] = candidate index of that language's answer sentence.
    """

    name: str
    languages: tuple[str, ...]
    cand_text: list[str]
    cand_lang: np.ndarray
    cand_group: np.ndarray
    q_id: list[str]
    q_text: list[str]
    q_lang: np.ndarray
    answers: dict[str, dict[str, int]]
    n_groups: int
    files: list[str] = field(default_factory=list)

    def candidates_in(self, lang: str) -> np.ndarray:
        """int64 indices of `lang`'s candidates, in file order."""
        return np.flatnonzero(self.cand_lang == self.languages.index(lang))

    def questions_in(self, lang: str) -> np.ndarray:
        """int64 indices of `lang`'s questions, in file order."""
        return np.flatnonzero(self.q_lang == self.languages.index(lang))


def _paths(dataset: str) -> dict[str, object]:
    """language -> verified local path, through the data registry (mirror, cache or download)."""
    from effir.data import registry

    commit, _, langs = DATASETS[dataset]
    out = {}
    for f in registry.files(dataset, "eval"):
        if f"/{commit}/" in f.path and f.langs and f.langs[0] in langs:
            out[f.langs[0]] = f
    missing = [lang for lang in langs if lang not in out]
    if missing:
        raise ValueError(f"data registry lacks {dataset} files for {missing} at lareqa commit {commit}")
    return {lang: registry.fetch(out[lang]) for lang in langs}


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]  # path halving
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _answer_sentence(breaks: list, answer_start: int) -> int:
    # The last sentence starting at or before the answer: the one holding its first character.
    starts = [b[0] for b in breaks]
    return max(0, bisect.bisect_right(starts, answer_start) - 1)


def load_lareqa(
    dataset: str = "xquad-r",
    *,
    languages=None,
    max_paragraphs=None,
    seed: int = 0,
    candidate: str = "sentence",
) -> LareqaData:
    """Load XQuAD-R or MLQA-R.

    languages: a subset of the data set's languages (default all). max_paragraphs: None (everything), an
    int N >= 1 (N parallel paragraph groups drawn with `seed`), or a float in (0, 1] (that fraction of the
    groups). A group is one paragraph in every language that has it (paragraphs linked by shared question
    ids), so the subset keeps the parallel structure. candidate: "sentence" or "sentence+context".
    """
    check_choice("dataset", dataset, tuple(DATASETS))
    check_choice("candidate", candidate, CANDIDATE_TEXTS)
    all_langs = DATASETS[dataset][2]
    if languages is None:
        langs = all_langs
    else:
        languages = [languages] if isinstance(languages, str) else list(languages)
        bad = [lang for lang in languages if lang not in all_langs]
        if bad or not languages:
            raise ValueError(f"languages must be a non-empty subset of {all_langs} for {dataset}, got {languages}")
        langs = tuple(lang for lang in all_langs if lang in languages)  # canonical order
    paths = _paths(dataset)

    # Pass 1: paragraphs per language; union paragraphs that share a question id (parallel groups).
    paras: list[tuple[str, dict]] = []
    uf = _UnionFind()
    for lang in langs:
        with open(paths[lang], encoding="utf-8") as fh:
            doc = json.load(fh)
        for article in doc["data"]:
            for para in article["paragraphs"]:
                key = len(paras)
                paras.append((lang, para))
                uf.find(("p", key))
                for qa in para["qas"]:
                    uf.union(("p", key), ("q", qa["id"]))
    roots = sorted({uf.find(("p", k)) for k in range(len(paras))}, key=str)
    group_of_root = {r: g for g, r in enumerate(roots)}
    para_group = [group_of_root[uf.find(("p", k))] for k in range(len(paras))]
    n_groups = len(roots)
    keep = _choose_groups(n_groups, max_paragraphs, seed)

    cand_text, cand_lang, cand_group = [], [], []
    q_id, q_text, q_lang = [], [], []
    answers: dict[str, dict[str, int]] = {}
    for key, (lang, para) in enumerate(paras):
        g = para_group[key]
        if keep is not None and g not in keep:
            continue
        li = langs.index(lang)
        base = len(cand_text)
        sentences, breaks = para["sentences"], para["sentence_breaks"]
        if len(sentences) != len(breaks) or not sentences:
            raise ValueError(f"{paths[lang]}: paragraph with {len(sentences)} sentences and {len(breaks)} breaks")
        for sent in sentences:
            cand_text.append(sent if candidate == "sentence" else f"{sent}\n{para['context']}")
            cand_lang.append(li)
            cand_group.append(g)
        for qa in para["qas"]:
            start = int(qa["answers"][0]["answer_start"])
            q_id.append(qa["id"])
            q_text.append(qa["question"])
            q_lang.append(li)
            per_lang = answers.setdefault(qa["id"], {})
            if lang in per_lang:
                raise ValueError(f"{paths[lang]}: question id {qa['id']} appears twice")
            per_lang[lang] = base + _answer_sentence(breaks, start)
    return LareqaData(
        name=dataset, languages=langs, cand_text=cand_text,
        cand_lang=np.asarray(cand_lang, dtype=np.int64), cand_group=np.asarray(cand_group, dtype=np.int64),
        q_id=q_id, q_text=q_text, q_lang=np.asarray(q_lang, dtype=np.int64), answers=answers,
        n_groups=n_groups if keep is None else len(keep), files=[str(paths[lang]) for lang in langs],
    )


def _choose_groups(n_groups: int, max_paragraphs, seed: int):
    """None (keep all) or the set of kept group ids."""
    if max_paragraphs is None:
        return None
    if isinstance(max_paragraphs, bool) or not isinstance(max_paragraphs, (int, float)):
        raise ValueError(f"max_paragraphs must be None, an int >= 1 or a float in (0, 1], got {max_paragraphs!r}")
    if isinstance(max_paragraphs, float):
        if not 0.0 < max_paragraphs <= 1.0:
            raise ValueError(f"max_paragraphs as a fraction must be in (0, 1], got {max_paragraphs}")
        n = max(1, round(max_paragraphs * n_groups))
    else:
        if max_paragraphs < 1:
            raise ValueError(f"max_paragraphs must be >= 1, got {max_paragraphs}")
        n = min(max_paragraphs, n_groups)
    if n >= n_groups:
        return None
    return set(random.Random(seed).sample(range(n_groups), n))
