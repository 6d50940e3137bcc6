"""effir: efficient training of multilingual dense retrievers.

Public API (imported lazily, so `import effir` stays cheap and never imports Triton by itself):

- Loss: `info_nce`, `InfoNCELoss`                      (effir.losses.info_nce)
  `MultipleNegativesRankingLoss`, `CachedMultipleNegativesRankingLoss` (sentence-transformers drop-ins)
                                                                  (effir.losses.mnrl, effir.losses.cached_mnrl)
  `patch_sentence_transformers()` (those drop-ins inside an unchanged sentence-transformers script)  (effir.patching)
- Adapters: `bottleneck_adapter`, `bottleneck_adapter_layernorm`, `BottleneckAdapter`,
  `add_adapters`, `save_adapters`, `load_adapters`, `AdapterConfig` presets  (effir.adapters)
- Encoders: `load_encoder`                              (effir.encoders)
- Data / sampling: `HybridBatchSampler`, `load_training_groups`  (effir.data)
- Evaluation: `evaluate`                                (effir.evaluation)
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it. One home per concept; this table is the whole public surface.
_EXPORTS = {
    "info_nce": "effir.losses.info_nce",
    "InfoNCELoss": "effir.losses.info_nce",
    "MultipleNegativesRankingLoss": "effir.losses.mnrl",
    "CachedMultipleNegativesRankingLoss": "effir.losses.cached_mnrl",
    "patch_sentence_transformers": "effir.patching",
    "unpatch_sentence_transformers": "effir.patching",
    "bottleneck_adapter": "effir.ops.bottleneck_adapter",
    "bottleneck_adapter_layernorm": "effir.ops.bottleneck_adapter",
    "BottleneckAdapter": "effir.adapters.modules",
    "AdapterConfig": "effir.adapters.config",
    "SeqBnConfig": "effir.adapters.config",
    "DoubleSeqBnConfig": "effir.adapters.config",
    "ParBnConfig": "effir.adapters.config",
    "add_adapters": "effir.adapters.inject",
    "save_adapters": "effir.adapters.io",
    "load_adapters": "effir.adapters.io",
    "load_encoder": "effir.encoders",
    "Encoder": "effir.encoders",
    "HybridBatchSampler": "effir.data.sampler",
    "ParallelGroup": "effir.data.groups",
    "load_training_groups": "effir.data.loaders",
    "evaluate": "effir.evaluation",
    "available_backends": "effir.backends",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'effir' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
