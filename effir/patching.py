"""Monkey-patching (Liger-Kernel's `apply_liger_kernel_to_*` pattern): make an unchanged sentence-transformers
script train on effir's fused loss.

    import effir
    effir.patch_sentence_transformers()   # before the script builds its loss
    from sentence_transformers import losses
    loss = losses.MultipleNegativesRankingLoss(model)   # effir's drop-in now

Replaces MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss, CachedMultipleNegativesRankingLoss
and CachedMultipleNegativesSymmetricRankingLoss in `sentence_transformers.losses` and
`sentence_transformers.sentence_transformer.losses` (where a script reads them) by effir.losses' classes of the
same name, which take the same arguments and give the same loss and gradients. Code that imported a class
before the patch keeps the original; arguments effir cannot fuse (a joint softmax over two directions,
hardness weighting, ...) raise a ValueError naming them. `unpatch_sentence_transformers()` restores.
"""
from __future__ import annotations

import importlib

_NAMES = ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
          "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")
_MODULES = ("sentence_transformers.losses", "sentence_transformers.sentence_transformer.losses")
_ORIGINALS: dict[tuple[str, str], type] = {}


def _modules():
    found = []
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if all(mod is not m for m in found):  # sentence-transformers 5.x aliases one module under both names
            found.append(mod)
    if not found:
        raise ImportError("patch_sentence_transformers: sentence-transformers is not installed "
                          f"(none of {', '.join(_MODULES)} imports)")
    return found


def patch_sentence_transformers() -> list[str]:
    """Point sentence-transformers' in-batch ranking losses at effir's (module doc); returns the patched names
    ("module.Class"). Idempotent."""
    import effir.losses as ours

    patched = []
    for mod in _modules():
        for name in _NAMES:
            current = getattr(mod, name, None)
            if current is None:
                continue
            if (mod.__name__, name) not in _ORIGINALS:
                _ORIGINALS[(mod.__name__, name)] = current
            setattr(mod, name, getattr(ours, name))
            patched.append(f"{mod.__name__}.{name}")
    return patched


def unpatch_sentence_transformers() -> None:
    """Put back the classes `patch_sentence_transformers` replaced."""
    for (modname, name), original in list(_ORIGINALS.items()):
        setattr(importlib.import_module(modname), name, original)
        del _ORIGINALS[(modname, name)]
