"""User-facing losses (sentence-transformers style: an nn.Module with a config dict)."""
from effir.losses.info_nce import InfoNCELoss, info_nce
from effir.losses.mnrl import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss
from effir.losses.cached_mnrl import CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss

__all__ = ["InfoNCELoss", "MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
           "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss", "info_nce"]
