"""Training and evaluation data: the registry (URL + sha256), parallel groups, loaders, the hybrid sampler.

- `registry`: `files(dataset, role)`, `fetch(file)` -> verified local path (mirror, cache or download).
- `groups`: `ParallelGroup` and the JSONL / `datasets` user format.
- `loaders`: `load_training_groups(...)` and one loader per source.
- `sampler`: `HybridBatchSampler` (X-X-mono / X-Y / hybrid batches); `batching.collate`.
"""
from effir.data.registry import DataFile, datasets, fetch, files, get  # noqa: F401
from effir.data.groups import (  # noqa: F401
    LoadStats,
    MalformedRecord,
    ParallelGroup,
    from_dataset,
    read_jsonl,
    write_jsonl,
)
from effir.data.loaders import DEFAULT_SOURCES, LOADERS, load_training_groups  # noqa: F401
from effir.data.sampler import Batch, BatchItem, HybridBatchSampler  # noqa: F401
from effir.data.batching import collate  # noqa: F401
