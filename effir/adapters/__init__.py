"""Bottleneck adapters: configs (AdapterHub presets), the fused module, injection into HF encoders, save/load."""
from effir.adapters.config import (ADAPTER_CONFIGS, AdapterConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig,
                                   resolve_config)
from effir.adapters.inject import (adapter_names, adapter_summary, add_adapters, find_adapter_sites,
                                   set_active_adapter)
from effir.adapters.io import convert_adapters, load_adapters, save_adapters
from effir.adapters.modules import BottleneckAdapter

__all__ = ["ADAPTER_CONFIGS", "AdapterConfig", "SeqBnConfig", "DoubleSeqBnConfig", "ParBnConfig", "resolve_config",
           "BottleneckAdapter", "add_adapters", "set_active_adapter", "adapter_summary", "adapter_names",
           "find_adapter_sites", "save_adapters", "load_adapters", "convert_adapters"]
