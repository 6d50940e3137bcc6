"""Shared test fixtures. Triton kernels run under its CPU interpreter when no GPU is present."""
import os
import sys
from pathlib import Path

# Must happen before anything imports triton.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach a model hub: a missing model must fail fast, not hang on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run (CI must not pass or fail by the draw: a random draw once
# found a degenerate input, B = M = d = 1, whose temperature gradient is below float64's own resolution of the
# reference); HYPOTHESIS_PROFILE=explore draws fresh ones, for looking for trouble on purpose.
settings.register_profile("effir", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "effir"))
sys.path.insert(0, str(REPO))  # `kernels/` and `bench/` importable from the source tree


@pytest.fixture(scope="session")
def data_dir():
    """The shared data mirror (`.../github`); skip with the reason when it is absent."""
    from effir._paths import data_mirror

    path = data_mirror()
    if path is None:
        pytest.skip("shared data mirror not found: set EFFIR_DATA_DIR to ../shared/data")
    return path


@pytest.fixture(scope="session")
def peer_python():
    """Python of the peers env (adapters + transformers 4.57), for AdapterHub / ST equivalence tests."""
    exe = Path(os.environ.get("EFFIR_PEER_PYTHON", REPO / ".venv-peers" / "bin" / "python"))
    if not exe.exists():
        pytest.skip(f"peers environment not installed ({exe}); run .ci/setup")
    return exe


@pytest.fixture
def cuda_device():
    if not _HAS_CUDA:
        pytest.skip("needs a CUDA GPU; none on this machine")
    return torch.device("cuda")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
