"""Zero-shot evaluation on LAReQA's XQuAD-R and MLQA-R (`effir.evaluate`, CLI `python -m effir.eval`).

- `lareqa`: the data sets as LAReQA defines them (candidates = every sentence, relevant = the answer
  sentence in every language);
- `metrics`: AP (sklearn semantics, ties), R@k, rank distance, from exact ranks;
- `search`: exact inner-product ranking with faiss or torch, in query blocks;
- `evaluate`: the Mo. / Cr. / Mul. settings; `report`: rich table and heatmap PNG.
"""
from effir.evaluation.evaluate import compute_metrics, evaluate  # noqa: F401
from effir.evaluation.lareqa import LareqaData, load_lareqa  # noqa: F401
