"""Where effir finds the repository, the shared data mirror and its cache."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """effir's on-disk cache (converted encoders, downloaded data): $EFFIR_CACHE or ~/.cache/effir."""
    path = Path(os.environ.get("EFFIR_CACHE", Path.home() / ".cache" / "effir"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_mirror() -> Path | None:
    """A local mirror of the `<owner>/<repo>/<commit>/<path>` data layout, or None.

    $EFFIR_DATA_DIR wins (it may point at `shared/data` or at its `github/` folder); otherwise the
    `../shared/data` beside the checkout, as laid out on developer and CI machines.
    """
    env = os.environ.get("EFFIR_DATA_DIR")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared" / "data"]
    for cand in candidates:
        if (cand / "github").is_dir():
            return cand / "github"
        if cand.is_dir() and cand.name == "github":
            return cand
    return None
