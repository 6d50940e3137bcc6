"""User-facing losses (sentence-transformers style: an nn.Module with a config dict)."""
from effir.losses.info_nce import InfoNCELoss, info_nce
from effir.losses.mnrl import MultipleNegativesRankingLoss

__all__ = ["InfoNCELoss", "MultipleNegativesRankingLoss", "info_nce"]
