"""Rule-based sentence splitting and paragraph chunking, enough to find the passage that holds an answer.

Deliberately simple (no models, no language tools), and the same for every source:

- A line break always ends a sentence.
- zh / ja: a sentence ends after 。！？!? (plus closing quotes or brackets); no space is needed.
- th: Thai writes no sentence punctuation; a space separates clauses and sentences. Pieces between spaces
  are merged left to right until a sentence has at least `THAI_MIN_CHARS` characters (XQuAD-R's Thai
  sentences have a median of ~176 characters; with 180 our splitter gives 889 sentences on XQuAD-R th
  against LAReQA's 852).
- Every other language: a sentence ends after . ! ? ؟ (Arabic) । ॥ (Devanagari) ۔ (plus closing quotes or
  brackets) followed by whitespace; । and ॥ need no whitespace. A period is *not* a boundary when the next
  word starts lowercase, or the word before it is a 1–3 digit number (Turkish / German ordinals:
  "19. yüzyıl", "1. Weltkrieg"), a single letter (initials "J. Smith") or a common abbreviation
  ("Dr.", "Mr.", "St.", "vs.").

Chunks (`passage="chunk"`) pack whole sentences greedily up to `max_chars`; a sentence longer than that is
cut at spaces (or hard, for unspaced text).
"""
from __future__ import annotations

import re

THAI_MIN_CHARS = 180
CJK = frozenset({"zh", "ja"})
# Characters per chunk: ~1000 characters of alphabetic text or ~450 of Chinese stay under the encoder's
# 512 tokens with the "passage: " prefix.
DEFAULT_CHUNK_CHARS = {"zh": 450, "ja": 450}
DEFAULT_CHUNK_CHARS_OTHER = 1000

_CLOSE = "\"'”’»」』）)]】"
_CJK_END = re.compile(f"[。！？!?]+[{re.escape(_CLOSE)}]*")
_DANDA_END = re.compile(f"[।॥]+[{re.escape(_CLOSE)}]*")
_OTHER_END = re.compile(f"[.!?؟۔]+[{re.escape(_CLOSE)}]*(?=\\s)")
_SMALL_WORD = re.compile(r"(?:^|\s|\()(\d{1,3}|\w|Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|Inc|Ltd|No|Vol|Nr|Bd)$")


def _line_spans(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"[^\n\r]+", text)]


def _trim(text: str, a: int, b: int) -> tuple[int, int] | None:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return (a, b) if a < b else None


def _period_is_boundary(text: str, dot: int, end: int) -> bool:
    if text[dot] != "." or end - dot > 1:  # "!", "?", "...", or a period followed by a closing quote
        return True
    nxt = re.match(r"\s*(\S)", text[end:])
    if nxt and nxt.group(1).islower():
        return False
    return _SMALL_WORD.search(text[max(0, dot - 8):dot]) is None


def _cuts(text: str, a: int, b: int, lang: str) -> list[int]:
    seg = text[a:b]
    if lang in CJK:
        return [a + m.end() for m in _CJK_END.finditer(seg)]
    cuts = [a + m.end() for m in _DANDA_END.finditer(seg)]
    for m in _OTHER_END.finditer(seg):
        if _period_is_boundary(text, a + m.start(), a + m.end()):
            cuts.append(a + m.end())
    return sorted(set(cuts))


def _thai(text: str, a: int, b: int) -> list[tuple[int, int]]:
    out, start = [], None
    for m in re.finditer(r"\S+", text[a:b]):
        s, e = a + m.start(), a + m.end()
        if start is None:
            start = s
        if e - start >= THAI_MIN_CHARS:
            out.append((start, e))
            start = None
    if start is not None:
        if out and (b - start) < THAI_MIN_CHARS // 2:  # a short tail joins the sentence before it
            out[-1] = (out[-1][0], _trim(text, start, b)[1])
        else:
            out.append(_trim(text, start, b))
    return out


def sentence_spans(text: str, lang: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text` (whitespace between them excluded)."""
    spans = []
    for a, b in _line_spans(text):
        if lang == "th":
            spans += _thai(text, a, b)
            continue
        prev = a
        for cut in _cuts(text, a, b, lang) + [b]:
            span = _trim(text, prev, cut)
            if span:
                spans.append(span)
            prev = cut
    return spans


def chunk_spans(text: str, lang: str, max_chars: int | None = None) -> list[tuple[int, int]]:
    """Spans of chunks of whole sentences, each at most `max_chars` long (default by language)."""
    max_chars = max_chars or DEFAULT_CHUNK_CHARS.get(lang, DEFAULT_CHUNK_CHARS_OTHER)
    if max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars}")
    pieces = []
    for a, b in sentence_spans(text, lang):
        while b - a > max_chars:  # an over-long sentence: cut at the last space that fits
            cut = text.rfind(" ", a + 1, a + max_chars + 1)
            cut = cut if cut > a else a + max_chars
            pieces.append((a, cut))
            a = _trim(text, cut, b)[0]
        pieces.append((a, b))
    chunks = []
    for a, b in pieces:
        if chunks and b - chunks[-1][0] <= max_chars:
            chunks[-1] = (chunks[-1][0], b)
        else:
            chunks.append((a, b))
    return chunks


def covering(text: str, spans: list[tuple[int, int]], start: int, end: int, *, single: bool = False) -> str:
    """The text of the spans overlapping [start, end) (joined, with the text between them).

    single=True returns only the span overlapping the most (chunks: keeps the passage within its
    length limit when an answer straddles two chunks). When the answer lies only in whitespace between
    spans, the nearest span is used.
    """
    if not spans:
        raise ValueError("text has no sentences (empty or whitespace only)")
    end = max(end, start + 1)
    hit = [i for i, (a, b) in enumerate(spans) if a < end and start < b]
    if not hit:
        i = min(range(len(spans)), key=lambda k: min(abs(spans[k][0] - start), abs(spans[k][1] - start)))
        hit = [i]
    if single and len(hit) > 1:
        best = max(hit, key=lambda k: min(end, spans[k][1]) - max(start, spans[k][0]))
        hit = [best]
    return text[spans[hit[0]][0]:spans[hit[-1]][1]]
