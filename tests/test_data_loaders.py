"""Training-data loaders: every source in ../shared/data with its real counts, malformed-record reporting,
the JSONL / `datasets` user format, and the sentence splitter."""
import json
import zipfile
from collections import Counter

import pytest

from effir.data import groups as G
from effir.data import loaders as L
from effir.data import registry
from effir.data.groups import MalformedRecord, ParallelGroup
from effir.data.segment import chunk_spans, covering, sentence_spans

# What the files really hold (sentence passages; chunk mode gives the same groups).
# MISSION's figures are the raw question counts; the differences are explained by `skipped` / `excluded`.
EXPECTED = {
    # source: (groups, records read, per-language groups, skipped by reason, excluded, repaired)
    "bipar": (3000, 6000, {"en": 3000, "zh": 3000}, {}, 0, {}),
    "xlinghealth": (936, 936, {"en": 935, "es": 936, "zh": 931, "hi": 936}, {"missing field": 6}, 0, {}),
    "tquad": (9200, 9200, {"tr": 9200}, {}, 0, {}),
    "arcd": (1377, 1377, {"ar": 1377}, {}, 18, {"answer text differs at its offset (offset kept)": 6}),
    "cmrc2018": (4219, 4221, {"zh": 4219}, {"missing field": 2}, 0, {"answer offset moved to the nearest match": 8}),
    "iapp": (7242, 7242, {"th": 7242}, {}, 0, {}),
    "tatoeba": (7363, 7548, {"en": 7363, "ar": 1000, "de": 1000, "es": 1000, "hi": 1000, "ru": 1000,
                             "th": 548, "tr": 1000, "zh": 1000}, {}, 0, {}),
}


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {name: fn(passage="sentence") for name, fn in L.LOADERS.items()}


@pytest.mark.data
@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_source_counts(loaded, source):
    groups, stats = loaded[source]
    n, records, per_lang, skipped, excluded, notes = EXPECTED[source]
    assert len(groups) == stats.groups == n
    assert stats.records == records
    assert G.languages(groups) == dict(sorted(per_lang.items())) == dict(sorted(stats.per_language.items()))
    assert dict(stats.skipped) == skipped and sum(stats.excluded.values()) == excluded and dict(stats.notes) == notes
    assert len({g.group_id for g in groups}) == n
    for g in groups:
        assert g.source == source and g.items
        for lang, (q, p) in g.items.items():
            assert lang in G.ISO_639_1 and q.strip() and p.strip() and q == q.strip()
    assert all(g.mono for g in groups) == (source != "tatoeba")


@pytest.mark.data
def test_problem_reports_name_file_and_line(loaded):
    _, st = loaded["xlinghealth"]
    assert "XLingHealth_medicationqa_benchmark.tsv:214 (row 212, en): missing field 'answer'" in st.examples
    assert sum("translated_question_Chinese" in e for e in st.examples) == 3
    _, st = loaded["cmrc2018"]
    assert any("cmrc2018_trial.json: data[" in e and "TRIAL_20_QUERY_0" in e for e in st.examples)
    with pytest.raises(MalformedRecord, match=r"XLingHealth_medicationqa_benchmark\.tsv:214"):
        L.load_xlinghealth(on_error="raise")


@pytest.mark.data
def test_passages_hold_the_answer(loaded):
    """Sentence passages are sentences of the context that contain the answer (TQuAD, re-read raw)."""
    groups, _ = loaded["tquad"]
    by_id = {g.group_id: g.items["tr"] for g in groups}
    hits = total = 0
    for f in registry.files("tquad", role="train-mono"):
        path = registry.fetch(f)
        for art in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    q, p = by_id[f"tquad:{path.stem}:{qa['id']}"]
                    assert p in para["context"] and q == qa["question"].strip()
                    total += 1
                    hits += qa["answers"][0]["text"] in p
    assert total == 9200 and hits / total > 0.99  # the rest: answers crossing a splitter boundary mid-word


@pytest.mark.data
def test_arcd_leaves_out_mlqa_articles(loaded):
    _, st = loaded["arcd"]
    assert dict(st.excluded) == {"article 'World War II' (in MLQA-R)": 9, "article 'Lion' (in MLQA-R)": 9}


@pytest.mark.data
@pytest.mark.parametrize("source", ["iapp", "cmrc2018", "bipar"])
def test_chunk_mode(loaded, source):
    sent, _ = loaded[source]
    chunk, st = L.LOADERS[source](passage="chunk", chunk_chars=600)
    assert [g.group_id for g in chunk] == [g.group_id for g in sent]
    inside = total = 0
    for a, b in zip(sent, chunk):
        for lang in a.items:
            total += 1
            assert len(b.items[lang][1]) <= 600
            inside += a.items[lang][1] in b.items[lang][1]
    assert inside / total > 0.98  # not inside: answer sentences longer than a chunk, cut


@pytest.mark.data
def test_default_mix_and_language_filter(data_dir):
    groups, stats = L.load_training_groups(return_stats=True)
    assert set(stats) == set(L.DEFAULT_SOURCES)
    assert len(groups) == 3000 + 936 + 9200 + 1377 + 4219 + 7242
    assert G.languages(groups) == {"ar": 1377, "en": 3935, "es": 936, "hi": 936, "th": 7242, "tr": 9200,
                                   "zh": 8150}
    sub = L.load_training_groups(("bipar", "xlinghealth"), languages=["zh", "es"], include_tatoeba=True)
    # Tatoeba groups are cross-only: without "en" only those sharing an English side with both es and zh stay.
    tato = [g for g in sub if g.source == "tatoeba"]
    assert tato and all(set(g.items) == {"es", "zh"} for g in tato)
    assert G.languages(sub) == {"es": 936 + len(tato), "zh": 3000 + 931 + len(tato)}
    with pytest.raises(ValueError, match="languages"):
        L.load_training_groups(("tquad",), languages=["eng"])
    with pytest.raises(ValueError, match="sources must be names"):
        L.load_training_groups(("squad",))
    with pytest.raises(ValueError, match="passage must be"):
        L.load_training_groups(("tquad",), passage="paragraph")


@pytest.mark.data
def test_tatoeba_held_out_languages(data_dir):
    groups, st = L.load_tatoeba(languages=list(L.TATOEBA_CODES.values()))
    assert st.records == 9548 and len(groups) == 9289
    assert st.per_language["el"] == st.per_language["vi"] == 1000
    default, _ = L.load_tatoeba()
    assert not {"el", "vi"} & set(G.languages(default))
    g = next(g for g in default if len(g.items) > 2)  # English sentences shared across pair files
    assert all(q == p for q, p in g.items.values()) and not g.mono


# ------------------------------------------------------------------------------- synthetic bad files


def _squad(tmp_path, name, qas, context="First sentence here. The answer is forty two. Last one."):
    path = tmp_path / name
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}),
                    encoding="utf-8")
    return path


def test_squad_malformed_records(tmp_path):
    ok = {"id": "a", "question": "What is it?", "answers": [{"text": "forty two", "answer_start": "35"}]}
    path = _squad(tmp_path, "mini.json", [
        ok,
        {"id": "b", "question": "", "answers": [{"text": "forty two", "answer_start": 35}]},
        {"id": "c", "question": "Where?", "answers": [{"text": "forty two", "answer_start": 900}]},
        {"id": "d", "question": "Which?", "answers": [{"text": "forty two", "answer_start": "x1"}]},
        {"id": "e", "question": "Who?", "answers": []},
        {"id": "f", "question": "Off?", "answers": [{"text": "forty two", "answer_start": 33}]},
    ])
    groups, st = L.load_tquad(files=[path])
    assert [g.group_id for g in groups] == ["tquad:mini:a", "tquad:mini:f"]
    assert groups[0].items == {"tr": ("What is it?", "The answer is forty two.")}
    assert groups[1].items["tr"][1] == "The answer is forty two."
    assert st.notes["answer offset moved to the nearest match"] == 1
    assert dict(st.skipped) == {"missing field": 2, "answer offset outside the context": 2}
    assert "mini.json: data[0].paragraphs[0].qas[2] (id 'c'): answer offset outside the context" in st.examples[1]
    with pytest.raises(MalformedRecord, match=r"mini\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'b'\): missing field 'question'"):
        L.load_tquad(files=[path], on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        L.load_tquad(files=[path], on_error="ignore")


def test_squad_hard_negatives_are_the_paragraphs_other_sentences(tmp_path):
    path = _squad(tmp_path, "neg.json", [
        {"id": "a", "question": "What is it?", "answers": [{"text": "forty two", "answer_start": 35}]},
        {"id": "b", "question": "Which first?", "answers": [{"text": "First", "answer_start": 0}]}])
    groups, _ = L.load_tquad(files=[path])
    assert groups[0].negatives == {"tr": ("First sentence here.", "Last one.")}
    assert groups[1].negatives == {"tr": ("The answer is forty two.", "Last one.")}
    # JSONL keeps them; a group without negatives writes none
    back, _ = G.read_jsonl(G.write_jsonl(groups + [ParallelGroup("x", "s", {"en": ("Q", "P")})], tmp_path / "n.jsonl"))
    assert back[0].negatives == groups[0].negatives and back[2].negatives == {}
    bad = {"group_id": "g", "source": "s", "items": {"en": {"question": "q", "passage": "p", "negatives": ["", "x"]}}}
    with pytest.raises(MalformedRecord, match=r"items\['en'\]\['negatives'\] must be a list of non-empty"):
        G.from_records([bad], on_error="raise")


def test_iapp_zip_and_bipar_pairs(tmp_path):
    zpath = tmp_path / "data.zip"
    good = {"question_id": "q1", "question": "คืออะไร", "context": "ประโยคแรก คำตอบอยู่ที่นี่",
            "answers": {"text": ["คำตอบ"], "answer_start": [10]}}
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("data/train.jsonl", json.dumps(good, ensure_ascii=False) + "\n{not json\n"
                    + json.dumps(dict(good, question_id="q2", answers={"text": ["x"], "answer_start": [99]})) + "\n")
    groups, st = L.load_iapp(files=[zpath])
    assert [g.group_id for g in groups] == ["iapp:q1"] and st.records == 3
    assert st.skipped == Counter({"not valid JSON": 1, "answer offset outside the context": 1})
    assert st.examples[0].startswith("data.zip!data/train.jsonl:2:")
    en = _squad(tmp_path, "Monolingual_EN_test.json", [
        {"id": "T_1_EN", "question": "Q1?", "answers": [{"text": "forty two", "answer_start": 35}]},
        {"id": "T_2_EN", "question": "Q2?", "answers": [{"text": "forty two", "answer_start": 35}]}])
    zh = _squad(tmp_path, "Monolingual_ZH_test.json", [
        {"id": "T_1_ZH", "question": "问题？", "answers": [{"text": "四十二", "answer_start": 4}]}],
        context="第一句。答案是四十二。最后。")
    groups, st = L.load_bipar(files=[en, zh])
    assert [(g.group_id, g.items) for g in groups] == [
        ("bipar:T_1", {"en": ("Q1?", "The answer is forty two."), "zh": ("问题？", "答案是四十二。")})]
    assert st.skipped == Counter({"no parallel partner": 1}) and "T_2_EN" in st.examples[0]


def test_xlinghealth_and_tatoeba_synthetic(tmp_path):
    cols = [c for pair in L._XLH_COLUMNS.values() for c in pair]
    tsv = tmp_path / "XLingHealth_x_benchmark.tsv"
    rows = ["\t".join(cols), "\t".join(f"v{i} &amp; w" for i in range(8)), "\t".join(["q", ""] + ["v"] * 6)]
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    groups, st = L.load_xlinghealth(files=[tsv])
    assert groups[0].items["en"] == ("v0 & w", "v1 & w") and set(groups[1].items) == {"hi", "zh", "es"}
    assert st.examples == ["XLingHealth_x_benchmark.tsv:3 (row 1, en): missing field 'answer'"]
    a, e = tmp_path / "tatoeba.deu-eng.deu", tmp_path / "tatoeba.deu-eng.eng"
    a.write_text("Hallo\n\n", encoding="utf-8")
    e.write_text("Hello\nBye\n", encoding="utf-8")
    groups, st = L.load_tatoeba(languages=["de"], files=[a, e])
    assert [g.items for g in groups] == [{"en": ("Hello", "Hello"), "de": ("Hallo", "Hallo")}]
    assert st.examples[0].endswith("tatoeba.deu-eng.deu:2: missing field (empty sentence)")
    e.write_text("Hello\n", encoding="utf-8")
    with pytest.raises(MalformedRecord, match="lines"):
        L.load_tatoeba(languages=["de"], files=[a, e])


# ---------------------------------------------------------------------------------------- user format


def _records():
    return [
        {"group_id": "g1", "source": "mine", "items": {"en": {"question": "Q?", "passage": "P."},
                                                       "de": {"question": "F?", "passage": "A."}}},
        {"group_id": "g2", "source": "mine", "items": {"el": {"question": "Ε;", "passage": "Α."}}, "mono": False},
    ]


def test_jsonl_roundtrip_and_errors(tmp_path):
    groups, st = G.from_records(_records())
    assert groups[0] == ParallelGroup("g1", "mine", {"en": ("Q?", "P."), "de": ("F?", "A.")})
    assert groups[0].languages == ("de", "en") and not groups[1].mono
    path = G.write_jsonl(groups, tmp_path / "g.jsonl")
    back, _ = G.read_jsonl(path)
    assert back == groups
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in _records()]
    lines += ["{oops", json.dumps({"group_id": "g3", "source": "s", "items": {"eng": {"question": "a", "passage": "b"}}}),
              json.dumps({"group_id": "g4", "source": "s", "items": {"en": {"question": "a"}}}),
              json.dumps(_records()[0]), "", json.dumps({"source": "s", "items": {}})]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    groups, st = G.read_jsonl(bad, on_error="skip")
    assert [g.group_id for g in groups] == ["g1", "g2"]
    assert st.skipped == Counter({"not valid JSON": 1, "unknown language code": 1, "missing field": 2,
                                  "duplicate group_id": 1})
    assert st.examples[0].startswith(f"{bad}:3: not valid JSON")
    assert st.examples[1] == f"{bad}:4: items: unknown language code 'eng' (expected ISO 639-1, e.g. 'en', 'zh')"
    assert st.examples[2] == f"{bad}:5: missing field items['en']['passage']"
    assert st.examples[4] == f"{bad}:8: missing field 'group_id'"  # blank line 7 skipped, numbering kept
    with pytest.raises(MalformedRecord, match=r"bad\.jsonl:3"):
        G.read_jsonl(bad)
    # JSONL paths go straight into the training mix.
    mix = L.load_training_groups([path])
    assert mix == back


def test_datasets_dataset_accepted():
    datasets = pytest.importorskip("datasets")
    recs = _records()
    recs[0]["mono"] = None  # from_list takes its columns from the first row
    ds = datasets.Dataset.from_list(recs)
    assert ds.column_names == ["group_id", "source", "items", "mono"]
    groups, st = G.from_dataset(ds)  # rows hold items: {"de": ..., "el": None, "en": ...}
    assert groups == G.from_records(_records())[0] and st.groups == 2
    with pytest.raises(ValueError, match="columns"):
        G.from_dataset(datasets.Dataset.from_list([{"id": 1}]))


# ------------------------------------------------------------------------------------------- splitter


@pytest.mark.parametrize("lang,text,expected", [
    ("en", "Dr. Smith came. He was 19. Then he left! The 3. item.", ["Dr. Smith came.", "He was 19. Then he left!", "The 3. item."]),  # the ordinal rule's price
    ("tr", "19. yüzyılda kuruldu. 1. Dünya Savaşı başladı.", ["19. yüzyılda kuruldu.", "1. Dünya Savaşı başladı."]),
    ("zh", "他来了。她走了！“真的吗？”是的，3.5元。", ["他来了。", "她走了！", "“真的吗？”", "是的，3.5元。"]),
    ("ar", "هذا سؤال؟ نعم، هذا صحيح. انتهى", ["هذا سؤال؟", "نعم، هذا صحيح.", "انتهى"]),
    ("hi", "यह एक वाक्य है। यह दूसरा है।तीसरा", ["यह एक वाक्य है।", "यह दूसरा है।", "तीसरा"]),
    ("de", "Er sagte: „Ja.“ Dann ging er.\nNeue Zeile", ["Er sagte: „Ja.“ Dann ging er.", "Neue Zeile"]),
])
def test_sentence_splitter(lang, text, expected):
    assert [text[a:b] for a, b in sentence_spans(text, lang)] == expected


def test_thai_and_chunks():
    words = ["คำ" * (k % 5 + 2) for k in range(200)]
    text = " ".join(words)
    spans = sentence_spans(text, "th")
    assert all(b - a >= 180 for a, b in spans[:-1]) and text[spans[0][0]:spans[-1][1]] == text
    chunks = chunk_spans(text, "th", 500)
    assert all(b - a <= 500 for a, b in chunks) and len(chunks) >= len(text) // 500
    assert covering(text, chunks, 700, 705, single=True) == next(text[a:b] for a, b in chunks if a <= 700 < b)
    nospace = "ก" * 1234
    assert [b - a for a, b in chunk_spans(nospace, "th", 500)] == [500, 500, 234]
