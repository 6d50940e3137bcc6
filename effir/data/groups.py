"""Parallel groups: the one training-data format, its JSONL / `datasets` forms, and load statistics.

A group is one question (and its passage) in every language it is available in: the items of a group are
translations of each other, so they must never serve as each other's negatives. A monolingual source gives
one-language groups.

JSONL user format, one group per line::

    {"group_id": "g1", "source": "mine", "items": {"en": {"question": "...", "passage": "...",
                                                          "negatives": ["...", "..."]},   # optional
                                                   "de": {"question": "...", "passage": "..."}},
     "mono": true}                                            # optional, default true

`negatives` (optional, per language): hard-negative passages for that language's question, e.g. the other
sentences of the paragraph that holds the answer (what the SQuAD-format loaders store); used by
`python -m effir.train --hard-negatives K`.

`mono: false` marks groups whose question and passage are the same sentence in each language (Tatoeba
sentence pairs): they only make sense across languages, so the sampler keeps them out of X-X-mono batches.
A `datasets.Dataset` with the columns `group_id`, `source`, `items` (and optionally `mono`) is accepted too.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("effir.data")

# ISO 639-1 (two-letter) codes: user data may use any of them; "eng", "zh-CN", "EN" are rejected so a
# language is never counted twice under two spellings.
ISO_639_1 = frozenset(
    "aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz "
    "ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik "
    "io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml "
    "mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd "
    "se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi "
    "vo wa wo xh yi yo za zh zu".split()
)
# The paper's training languages; el and vi are held out (zero-shot) there.
TRAIN_LANGUAGES = ("ar", "zh", "en", "de", "hi", "ru", "es", "th", "tr")
EVAL_LANGUAGES = ("ar", "zh", "en", "de", "hi", "ru", "es", "th", "tr", "el", "vi")


class MalformedRecord(ValueError):
    """A training record that cannot be used; the message names the file and line (or record index)."""


def check_language(code, where: str = "language") -> str:
    """Return `code` if it is an ISO 639-1 code, else raise MalformedRecord naming `where`."""
    if not isinstance(code, str) or code not in ISO_639_1:
        raise MalformedRecord(f"{where}: unknown language code {code!r} (expected ISO 639-1, e.g. 'en', 'zh')")
    return code


@dataclass
class ParallelGroup:
    """One question in one or more languages.

    group_id: unique over the training mix (e.g. "tquad:train-v0.1:17");
    source: the data set it came from; items: ISO 639-1 code -> (question, passage);
    mono: whether the group may feed X-X-mono batches (False for sentence pairs, see the module docstring);
    negatives: ISO 639-1 code -> hard-negative passages in that language (none by default).
    """

    group_id: str
    source: str
    items: dict[str, tuple[str, str]]
    mono: bool = True
    negatives: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def languages(self) -> tuple[str, ...]:
        """The group's languages, sorted."""
        return tuple(sorted(self.items))

    def to_record(self) -> dict:
        rec = {
            "group_id": self.group_id,
            "source": self.source,
            "items": {lang: {"question": q, "passage": p} for lang, (q, p) in sorted(self.items.items())},
        }
        for lang, negs in self.negatives.items():
            if negs:
                rec["items"][lang]["negatives"] = list(negs)
        if not self.mono:
            rec["mono"] = False
        return rec


def languages(groups: Iterable[ParallelGroup]) -> dict[str, int]:
    """Number of groups holding each language, sorted by language code."""
    c = Counter(lang for g in groups for lang in g.items)
    return dict(sorted(c.items()))


@dataclass
class LoadStats:
    """What a loader read: groups kept, records skipped by reason, examples of the problems.

    `skipped` counts malformed records (reason -> count); `excluded` counts records left out on purpose
    (e.g. ARCD articles that MLQA-R also holds); `notes` counts repairs that kept a record (reason -> count).
    """

    source: str
    groups: int = 0
    records: int = 0
    per_language: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    excluded: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def problem(self, exc: MalformedRecord, reason: str, on_error: str) -> None:
        """Count (on_error="skip") or raise (on_error="raise") one malformed record."""
        if on_error == "raise":
            raise exc
        self.skipped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(exc))

    def add(self, group: ParallelGroup) -> None:
        self.groups += 1
        self.per_language.update(list(group.items))

    def summary(self) -> str:
        parts = [f"{self.source}: {self.groups} groups from {self.records} records"]
        if self.skipped:
            parts.append(f"skipped {dict(self.skipped)}")
        if self.excluded:
            parts.append(f"excluded {dict(self.excluded)}")
        if self.notes:
            parts.append(f"repaired {dict(self.notes)}")
        return "; ".join(parts)

    def report(self) -> None:
        """Log the summary (WARNING when records were skipped, so skipping is never silent)."""
        (log.warning if self.skipped else log.info)(self.summary())


def check_on_error(on_error: str) -> str:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    return on_error


def group_from_record(rec, where: str) -> ParallelGroup:
    """Build a group from a JSON-like record; MalformedRecord (naming `where`) when a field is wrong."""
    if not isinstance(rec, Mapping):
        raise MalformedRecord(f"{where}: a group must be a JSON object, got {type(rec).__name__}")
    for key in ("group_id", "source", "items"):
        if rec.get(key) in (None, "", {}):
            raise MalformedRecord(f"{where}: missing field {key!r}")
    items = rec["items"]
    if not isinstance(items, Mapping):
        raise MalformedRecord(f"{where}: 'items' must map language codes to {{question, passage}}")
    out, negatives = {}, {}
    for lang, item in items.items():
        if item is None:  # `datasets` fills languages absent from a row with None
            continue
        check_language(lang, f"{where}: items")
        if not isinstance(item, Mapping):
            raise MalformedRecord(f"{where}: items[{lang!r}] must be an object with question and passage")
        q, p = item.get("question"), item.get("passage")
        for name, val in (("question", q), ("passage", p)):
            if not isinstance(val, str) or not val.strip():
                raise MalformedRecord(f"{where}: missing field items[{lang!r}][{name!r}]")
        out[lang] = (q, p)
        negs = item.get("negatives")
        if negs is not None:
            if not isinstance(negs, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in negs):
                raise MalformedRecord(f"{where}: items[{lang!r}]['negatives'] must be a list of non-empty "
                                      "passage strings")
            if negs:
                negatives[lang] = tuple(negs)
    if not out:
        raise MalformedRecord(f"{where}: missing field 'items' (no language has a question and a passage)")
    mono = rec.get("mono")
    mono = True if mono is None else mono  # absent, or null where a `datasets` column holds it for other rows
    if not isinstance(mono, bool):
        raise MalformedRecord(f"{where}: 'mono' must be true or false, got {mono!r}")
    return ParallelGroup(str(rec["group_id"]), str(rec["source"]), out, mono, negatives)


def reason_of(exc: MalformedRecord) -> str:
    """The counting key of a problem: the first known reason its message names, else "invalid record"."""
    msg = str(exc)
    for reason in ("unknown language code", "answer offset outside the context", "missing field",
                   "no parallel partner", "not valid JSON", "duplicate group_id"):
        if reason in msg:
            return reason
    return "invalid record"


def _collect(located, name: str, on_error: str) -> tuple[list[ParallelGroup], LoadStats]:
    """Groups from (where, record-or-MalformedRecord) pairs, with duplicate-id checks and stats."""
    check_on_error(on_error)
    stats = LoadStats(source=name)
    groups, seen = [], set()
    for where, rec in located:
        stats.records += 1
        try:
            if isinstance(rec, MalformedRecord):
                raise rec
            g = group_from_record(rec, where)
            if g.group_id in seen:
                raise MalformedRecord(f"{where}: duplicate group_id {g.group_id!r}")
        except MalformedRecord as exc:
            stats.problem(exc, reason_of(exc), on_error)
            continue
        seen.add(g.group_id)
        groups.append(g)
        stats.add(g)
    return groups, stats


def from_records(records: Iterable, *, name: str = "records", on_error: str = "raise"):
    """Groups from JSON-like records (`name` labels them in messages); returns (groups, stats)."""
    return _collect(((f"{name} record {i}", r) for i, r in enumerate(records)), name, on_error)


def read_jsonl(path: str | Path, *, on_error: str = "raise") -> tuple[list[ParallelGroup], LoadStats]:
    """Read groups from a JSONL file (format in the module docstring); problems name the file and line."""
    path = Path(path)

    def located():
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, MalformedRecord(f"{where}: not valid JSON ({exc.msg})")

    return _collect(located(), str(path), on_error)


def write_jsonl(groups: Iterable[ParallelGroup], path: str | Path) -> Path:
    """Write groups as JSONL (UTF-8, one group per line); returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as fh:
        for g in groups:
            fh.write(json.dumps(g.to_record(), ensure_ascii=False) + "\n")
    return path


def from_dataset(ds, *, on_error: str = "raise") -> tuple[list[ParallelGroup], LoadStats]:
    """Groups from a `datasets.Dataset` (or any iterable of dict rows) with the JSONL columns."""
    cols = getattr(ds, "column_names", None)
    if cols is not None:
        missing = {"group_id", "source", "items"} - set(cols)
        if missing:
            raise ValueError(f"ds must have columns group_id, source, items; missing {sorted(missing)}")
    return from_records(iter(ds), name=f"dataset {type(ds).__name__}", on_error=on_error)
