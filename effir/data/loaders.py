"""Loaders: every training source in the registry -> parallel groups (`effir.data.groups.ParallelGroup`).

Every loader takes `passage="sentence"|"chunk"`, `on_error="skip"|"raise"`, `chunk_chars` and returns
`(groups, LoadStats)`. The passage is the sentence holding the answer (LAReQA style, `effir.data.segment`)
or the chunk of the paragraph holding it. Problems name the file and the line (JSONL / TSV) or the record
index (SQuAD JSON). Sources with no answer span (XLingHealth, Tatoeba) use their whole answer / sentence.

| source       | languages    | groups                                     |
|--------------|--------------|--------------------------------------------|
| bipar        | en+zh        | one per question id (`_EN` / `_ZH` dropped) |
| xlinghealth  | en+es+zh+hi  | one per TSV row; passage = the answer       |
| tquad        | tr           | one per question                            |
| arcd         | ar           | one per question; articles "World War II" and "Lion" left out (MLQA-R holds them) |
| cmrc2018     | zh           | one per question                            |
| iapp         | th           | one per question (JSONL in a zip)           |
| tatoeba      | en+X         | optional; sentences with the same English side share one group; mono=False |
"""
from __future__ import annotations

import csv
import html
import io
import json
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from effir.data import registry
from effir.data.groups import (
    LoadStats,
    MalformedRecord,
    ParallelGroup,
    check_language,
    check_on_error,
    read_jsonl,
    reason_of,
)
from effir.data.segment import DEFAULT_CHUNK_CHARS, DEFAULT_CHUNK_CHARS_OTHER, chunk_spans, covering, sentence_spans

DEFAULT_SOURCES = ("bipar", "xlinghealth", "tquad", "arcd", "cmrc2018", "iapp")
# ARCD articles also present in MLQA-R (evaluation must stay zero-shot): Arabic title -> English.
ARCD_EXCLUDED_TITLES = {"الحرب العالمية الثانية": "World War II", "أسد": "Lion"}
TATOEBA_CODES = {"ara": "ar", "cmn": "zh", "deu": "de", "ell": "el", "hin": "hi", "rus": "ru", "spa": "es",
                 "tha": "th", "tur": "tr", "vie": "vi", "eng": "en"}
# el and vi are the paper's unseen languages: Tatoeba's el/vi pairs stay out unless asked for.
TATOEBA_DEFAULT_LANGUAGES = ("ar", "de", "es", "hi", "ru", "th", "tr", "zh")
_MISSING = "missing field"
_OFFSET = "answer offset outside the context"


def _check_passage(passage: str) -> str:
    if passage not in ("sentence", "chunk"):
        raise ValueError(f"passage must be 'sentence' or 'chunk', got {passage!r}")
    return passage


class _Passages:
    """Sentence / chunk spans of one context, computed once for all its questions."""

    def __init__(self, context: str, lang: str, passage: str, chunk_chars: int | None):
        self.context, self.lang, self.passage, self.chunk_chars = context, lang, passage, chunk_chars
        self._spans = None

    def around(self, start: int, end: int) -> str:
        if self._spans is None:
            if self.passage == "sentence":
                self._spans = sentence_spans(self.context, self.lang)
            else:
                self._spans = chunk_spans(self.context, self.lang, self.chunk_chars)
        return covering(self.context, self._spans, start, end, single=self.passage == "chunk")

    def others(self, passage: str) -> tuple[str, ...]:
        """The context's other sentences (chunks) than those in `passage` (from `around`): the hard negatives
        of its question, as LAReQA's candidate pool puts them beside the answer sentence."""
        texts = (self.context[a:b].strip() for a, b in self._spans)
        return tuple(dict.fromkeys(t for t in texts if t and t not in passage))


def _answer_start(context: str, answers, where: str, stats: LoadStats) -> tuple[int, int]:
    """(start, end) of the first answer whose offset lies inside the context; repairs off-by-a-few offsets."""
    if not answers:
        raise MalformedRecord(f"{where}: missing field 'answers'")
    bad = None
    for ans in answers:
        text, start = ans.get("text"), ans.get("answer_start")
        if not isinstance(text, str) or not text.strip() or start is None:
            bad = bad or MalformedRecord(f"{where}: missing field 'answers[].text' or 'answer_start'")
            continue
        try:
            start = int(start)  # TQuAD stores it as a string
        except (TypeError, ValueError):
            bad = MalformedRecord(f"{where}: {_OFFSET}: answer_start {start!r} is not an integer")
            continue
        if start < 0 or start + len(text) > len(context):
            bad = MalformedRecord(
                f"{where}: {_OFFSET}: answer_start {start} + len {len(text)} not in [0, {len(context)}]")
            continue
        if context[start:start + len(text)] == text:
            return start, start + len(text)
        # A few upstream offsets are off by 1–2 characters (CMRC) or the text differs in whitespace (ARCD):
        # take the occurrence nearest to the offset, else trust the offset.
        hits = [i for i in _find_all(context, text)]
        if hits:
            stats.notes["answer offset moved to the nearest match"] += 1
            best = min(hits, key=lambda i: abs(i - start))
            return best, best + len(text)
        stats.notes["answer text differs at its offset (offset kept)"] += 1
        return start, start + len(text)
    raise bad


def _find_all(text: str, sub: str) -> Iterator[int]:
    i = text.find(sub)
    while i >= 0:
        yield i
        i = text.find(sub, i + 1)


def _squad_records(path: Path, lang: str, passage: str, chunk_chars, stats: LoadStats, on_error: str,
                   exclude_titles: dict | None = None) -> Iterator[tuple[str, str, str]]:
    """(question id, question, passage, hard negatives) for every usable question of a SQuAD-format JSON file;
    the negatives are the paragraph's other passages (`_Passages.others`)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise MalformedRecord(f"{path}: not SQuAD JSON (no 'data' list)")
    for ai, art in enumerate(articles):
        title = art.get("title", "")
        paras = art.get("paragraphs") or []
        if exclude_titles and title in exclude_titles:
            n_questions = sum(len(p.get("qas", [])) for p in paras)
            stats.excluded[f"article {exclude_titles[title]!r} (in MLQA-R)"] += n_questions
            continue
        for pi, para in enumerate(paras):
            context = para.get("context")
            spans = _Passages(context, lang, passage, chunk_chars) if isinstance(context, str) else None
            for qi, qa in enumerate(para.get("qas") or []):
                stats.records += 1
                where = f"{path.name}: data[{ai}].paragraphs[{pi}].qas[{qi}] (id {qa.get('id')!r})"
                try:
                    if spans is None or not context.strip():
                        raise MalformedRecord(f"{where}: {_MISSING} 'context'")
                    question = qa.get("question")
                    if not isinstance(question, str) or not question.strip():
                        raise MalformedRecord(f"{where}: {_MISSING} 'question'")
                    if qa.get("id") is None:
                        raise MalformedRecord(f"{where}: {_MISSING} 'id'")
                    start, end = _answer_start(context, qa.get("answers"), where, stats)
                except MalformedRecord as exc:
                    stats.problem(exc, reason_of(exc), on_error)
                    continue
                p = spans.around(start, end)
                yield str(qa["id"]), question.strip(), p, spans.others(p)


def _mono_squad(source: str, lang: str, files: Iterable, passage, on_error, chunk_chars, exclude_titles=None):
    check_on_error(on_error)
    _check_passage(passage)
    stats, groups = LoadStats(source=source), []
    for f in files:
        path = registry.fetch(f) if isinstance(f, registry.DataFile) else Path(f)
        for qid, q, p, negs in _squad_records(path, lang, passage, chunk_chars, stats, on_error, exclude_titles):
            g = ParallelGroup(f"{source}:{path.stem}:{qid}", source, {lang: (q, p)}, negatives={lang: negs})
            groups.append(g)
            stats.add(g)
    return groups, stats


def _files(dataset: str, role: str | None = None) -> list:
    return [f for f in registry.files(dataset) if role is None or f.role == role]


def load_tquad(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """TQuAD (Turkish, SQuAD JSON; `answer_start` stored as a string). `files` overrides the registry."""
    return _mono_squad("tquad", "tr", files or _files("tquad"), passage, on_error, chunk_chars)


def load_arcd(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """ARCD (Arabic), without the articles "World War II" and "Lion" that MLQA-R also holds."""
    return _mono_squad("arcd", "ar", files or _files("arcd"), passage, on_error, chunk_chars, ARCD_EXCLUDED_TITLES)


def load_cmrc2018(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """CMRC 2018 (Chinese, SQuAD JSON: trial + dev, the splits published with answers)."""
    return _mono_squad("cmrc2018", "zh", files or _files("cmrc2018"), passage, on_error, chunk_chars)


def load_iapp(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """iApp wiki QA (Thai): JSONL members of a zip; problems name `zip!member:line`."""
    check_on_error(on_error)
    _check_passage(passage)
    stats, groups = LoadStats(source="iapp"), []
    for f in files or _files("iapp-wiki-qa"):
        path = registry.fetch(f) if isinstance(f, registry.DataFile) else Path(f)
        with zipfile.ZipFile(path) as zf:
            for member in sorted(n for n in zf.namelist() if n.endswith(".jsonl")):
                with zf.open(member) as fh:
                    for lineno, line in enumerate(io.TextIOWrapper(fh, encoding="utf-8"), 1):
                        if not line.strip():
                            continue
                        stats.records += 1
                        where = f"{path.name}!{member}:{lineno}"
                        try:
                            g = _iapp_group(line, where, passage, chunk_chars, stats)
                        except MalformedRecord as exc:
                            stats.problem(exc, reason_of(exc), on_error)
                            continue
                        groups.append(g)
                        stats.add(g)
    return groups, stats


def _iapp_group(line: str, where: str, passage: str, chunk_chars, stats) -> ParallelGroup:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MalformedRecord(f"{where}: not valid JSON ({exc.msg})") from None
    for key in ("question_id", "question", "context", "answers"):
        if not rec.get(key) or (isinstance(rec[key], str) and not rec[key].strip()):
            raise MalformedRecord(f"{where}: {_MISSING} {key!r}")
    ans = rec["answers"]
    answers = [{"text": t, "answer_start": s} for t, s in zip(ans.get("text") or [], ans.get("answer_start") or [])]
    start, end = _answer_start(rec["context"], answers, where, stats)
    spans = _Passages(rec["context"], "th", passage, chunk_chars)
    p = spans.around(start, end)
    return ParallelGroup(f"iapp:{rec['question_id']}", "iapp", {"th": (rec["question"].strip(), p)},
                         negatives={"th": spans.others(p)})


def load_bipar(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """BiPaR (English–Chinese novels): EN and ZH files of a split pair up by id minus `_EN` / `_ZH`.

    A question whose id has no partner in the other language is reported ("no parallel partner").
    """
    check_on_error(on_error)
    _check_passage(passage)
    stats, groups = LoadStats(source="bipar"), []
    by_split: dict[str, dict[str, list]] = defaultdict(dict)
    for f in files or _files("bipar"):
        path = registry.fetch(f) if isinstance(f, registry.DataFile) else Path(f)
        # Monolingual_EN_test.json -> ("en", "test")
        parts = path.stem.split("_")
        lang, split = parts[-2].lower(), parts[-1]
        check_language(lang, str(path))
        by_split[split][lang] = (path, list(_squad_records(path, lang, passage, chunk_chars, stats, on_error)))
    for split in sorted(by_split):
        sides = by_split[split]
        items: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
        origin = {}
        for lang, (path, recs) in sorted(sides.items()):
            suffix = f"_{lang.upper()}"
            # no hard negatives from parallel paragraphs: another question's answer in the other language
            # would be one, and only the same-language text of a batch's positives can be checked against them
            for qid, q, p, _negatives in recs:
                base = qid[: -len(suffix)] if qid.endswith(suffix) else qid
                items[base][lang] = (q, p)
                origin.setdefault(base, f"{path.name} id {qid!r}")
        for base, langs in items.items():
            if len(langs) < len(sides):
                missing = sorted(set(sides) - set(langs))
                exc = MalformedRecord(f"{origin[base]}: no parallel partner in {missing}")
                stats.problem(exc, "no parallel partner", on_error)
                continue
            g = ParallelGroup(f"bipar:{base}", "bipar", dict(langs))
            groups.append(g)
            stats.add(g)
    return groups, stats


_XLH_COLUMNS = {"en": ("question", "answer"), "hi": ("translated_question_Hindi", "translated_answer_Hindi"),
                "zh": ("translated_question_Chinese", "translated_answer_Chinese"),
                "es": ("translated_question_Spanish", "translated_answer_Spanish")}


def load_xlinghealth(*, passage="sentence", on_error="skip", chunk_chars=None, files=None):
    """XLingHealth (en/es/zh/hi medical QA, TSV). The passage is the answer (no span to locate), cut to its
    first chunk of `chunk_chars`. A language with an empty question or answer is reported and left out of
    its group; the group keeps its other languages.
    """
    check_on_error(on_error)
    _check_passage(passage)
    stats, groups = LoadStats(source="xlinghealth"), []
    for f in files or _files("xlinghealth"):
        path = registry.fetch(f) if isinstance(f, registry.DataFile) else Path(f)
        short = path.stem.replace("XLingHealth_", "").replace("_benchmark", "")
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            missing_cols = {c for pair in _XLH_COLUMNS.values() for c in pair} - set(reader.fieldnames or [])
            if missing_cols:
                raise MalformedRecord(f"{path}: {_MISSING}s (columns) {sorted(missing_cols)}")
            line = reader.line_num + 1
            for i, row in enumerate(reader):
                stats.records += 1
                items = {}
                for lang, (qc, ac) in _XLH_COLUMNS.items():
                    # LiveQA text carries HTML entities ("&apos;", "&amp;"): unescape them.
                    q, a = (html.unescape(row.get(qc) or "").strip(), html.unescape(row.get(ac) or "").strip())
                    if not q or not a:
                        col = qc if not q else ac
                        exc = MalformedRecord(f"{path.name}:{line} (row {i}, {lang}): {_MISSING} {col!r}")
                        stats.problem(exc, _MISSING, on_error)
                        continue
                    items[lang] = (q, _first_chunk(a, lang, chunk_chars))
                line = reader.line_num + 1
                if items:
                    g = ParallelGroup(f"xlinghealth:{short}:{i}", "xlinghealth", items)
                    groups.append(g)
                    stats.add(g)
    return groups, stats


def _first_chunk(text: str, lang: str, chunk_chars) -> str:
    limit = chunk_chars or DEFAULT_CHUNK_CHARS.get(lang, DEFAULT_CHUNK_CHARS_OTHER)
    if len(text) <= limit:
        return text
    a, b = chunk_spans(text, lang, limit)[0]
    return text[a:b]


def load_tatoeba(*, languages=TATOEBA_DEFAULT_LANGUAGES, on_error="skip", files=None, passage=None, chunk_chars=None):
    """Tatoeba en–X sentence pairs (LASER test set), a weak cross-lingual signal.

    Each language's item is (sentence, sentence): a cross pair (X, en) then asks to retrieve the English
    translation of an X sentence (and the reverse), while a mono pair would be trivial, so the groups carry
    mono=False. Pairs whose English sentences are identical share one group, which adds X–Y pairs between
    non-English languages. el and vi are left out by default (the paper keeps them unseen).
    `passage` and `chunk_chars` are accepted for a uniform loader signature and ignored (sentences only).
    """
    check_on_error(on_error)
    wanted = {check_language(lang, "languages") for lang in languages}
    stats, groups = LoadStats(source="tatoeba"), []
    by_en: dict[str, ParallelGroup] = {}
    chosen = files or _files("tatoeba")
    pairs = defaultdict(dict)
    for f in chosen:
        name = f.name if isinstance(f, registry.DataFile) else Path(f).name
        code3 = name.split(".")[1].split("-")[0]          # tatoeba.ara-eng.eng -> ara
        pairs[code3][name.rsplit(".", 1)[-1]] = f
    for code3 in sorted(pairs):
        lang = TATOEBA_CODES.get(code3)
        if lang not in wanted:
            continue
        side = {k: registry.fetch(v) if isinstance(v, registry.DataFile) else Path(v) for k, v in pairs[code3].items()}
        x_lines = side[code3].read_text(encoding="utf-8").splitlines()
        en_lines = side["eng"].read_text(encoding="utf-8").splitlines()
        if len(x_lines) != len(en_lines):
            raise MalformedRecord(f"{side[code3]}: {len(x_lines)} lines but {side['eng'].name} has {len(en_lines)}")
        for lineno, (x, en) in enumerate(zip(x_lines, en_lines), 1):
            stats.records += 1
            x, en = x.strip(), en.strip()
            if not x or not en:
                exc = MalformedRecord(f"{side[code3 if not x else 'eng']}:{lineno}: {_MISSING} (empty sentence)")
                stats.problem(exc, _MISSING, on_error)
                continue
            g = by_en.get(en)
            if g is None or lang in g.items:
                g = ParallelGroup(f"tatoeba:{code3}:{lineno}", "tatoeba", {"en": (en, en)}, mono=False)
                by_en[en] = g
                groups.append(g)
            g.items[lang] = (x, x)
    for g in groups:
        stats.add(g)
    return groups, stats


LOADERS = {"bipar": load_bipar, "xlinghealth": load_xlinghealth, "tquad": load_tquad, "arcd": load_arcd,
           "cmrc2018": load_cmrc2018, "iapp": load_iapp, "tatoeba": load_tatoeba}


def load_training_groups(sources=DEFAULT_SOURCES, *, passage="sentence", include_tatoeba=False, on_error="skip",
                         languages=None, chunk_chars=None, return_stats=False):
    """The training mix as parallel groups.

    sources: names from `LOADERS` and/or paths of JSONL files in the group format. passage: "sentence"
    (the sentence holding the answer) or "chunk" (the paragraph chunk holding it, `chunk_chars` long at
    most). include_tatoeba: add Tatoeba sentence pairs. on_error: "skip" (count and log malformed records)
    or "raise" (stop at the first, naming file and line). languages: keep only these ISO 639-1 codes
    (groups left with no language are dropped). Returns the groups, or (groups, {source: LoadStats}) with
    return_stats=True.
    """
    check_on_error(on_error)
    _check_passage(passage)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = list(sources) + (["tatoeba"] if include_tatoeba and "tatoeba" not in sources else [])
    keep = None
    if languages is not None:
        keep = set()
        for lang in languages:
            try:
                keep.add(check_language(lang, "languages"))
            except MalformedRecord as exc:
                raise ValueError(str(exc)) from None
    all_groups, all_stats = [], {}
    for src in sources:
        if isinstance(src, Path) or (isinstance(src, str) and src not in LOADERS):
            if not Path(src).is_file():
                raise ValueError(f"sources must be names in {sorted(LOADERS)} or JSONL paths, got {src!r}")
            groups, stats = read_jsonl(src, on_error=on_error)
        elif src == "tatoeba":
            tl = TATOEBA_DEFAULT_LANGUAGES if keep is None else sorted(keep - {"en"})
            groups, stats = load_tatoeba(languages=tl, on_error=on_error)
        else:
            groups, stats = LOADERS[src](passage=passage, on_error=on_error, chunk_chars=chunk_chars)
        stats.report()
        all_stats[str(src)] = stats
        all_groups += groups
    if keep is not None:
        all_groups = list(_restrict(all_groups, keep))
    seen = set()
    for g in all_groups:
        if g.group_id in seen:
            raise ValueError(f"sources: group_id {g.group_id!r} appears in two sources; make ids unique")
        seen.add(g.group_id)
    return (all_groups, all_stats) if return_stats else all_groups


def _restrict(groups, keep: set[str]) -> Iterator[ParallelGroup]:
    for g in groups:
        items = {lang: v for lang, v in g.items.items() if lang in keep}
        if len(items) >= (1 if g.mono else 2):  # a cross-only group needs two languages
            yield ParallelGroup(g.group_id, g.source, items, g.mono,
                                {lang: v for lang, v in g.negatives.items() if lang in keep})
