"""User-facing losses (sentence-transformers style: an nn.Module with a config dict)."""
from effir.losses.info_nce import InfoNCELoss, info_nce

__all__ = ["InfoNCELoss", "info_nce"]
