"""Training and evaluation data: the registry (URL + sha256), parallel groups, loaders, the hybrid sampler.

- `registry`: `files(dataset, role)`, `fetch(file)` -> verified local path (mirror, cache or download).
- `groups`: `ParallelGroup` and the JSONL / `datasets` user format.
- `loaders`: `load_training_groups(...)` and one loader per source.
- `sampler`: `HybridBatchSampler` (X-X-mono / X-Y / hybrid batches); `batching.collate`.
"""
from effir.data.registry import DataFile, files, fetch, datasets, get  # noqa: F401
