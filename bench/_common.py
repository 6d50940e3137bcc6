"""Helpers shared by every benchmark: provenance, peak memory, FLOP rates, result files."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def provenance() -> dict:
    """Machine, card, driver, library versions and git commit: attached to every result file."""
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain")),
        # the content of the tracked + untracked-not-ignored files as a git tree: equal to `git rev-parse
        # C^{tree}` of the commit C that holds exactly this code, even where HEAD is stale (the GPU machine gets
        # the working tree copied over the session's first checkout, so there HEAD lags and dirty is True)
        "tree": _worktree_tree(),
    }
    for mod in ("triton", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_sms=props.multi_processor_count, gpu_mem_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda, driver=_driver_version())
    return info


def _worktree_tree() -> str | None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        try:
            root = Path(__file__).resolve().parent.parent
            for args in (["read-tree", "HEAD"], ["add", "-A"]):
                subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, timeout=60, check=True)
            out = subprocess.run(["git", "write-tree"], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=60, check=True)
            return out.stdout.strip()
        except Exception:
            return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        return None


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _vm_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


class PeakMemory(contextlib.AbstractContextManager):
    """Peak memory added by the body, in bytes (`.peak`).

    CUDA: torch's allocator peak above the allocation at entry. CPU: the process's resident-set high-water
    mark (VmHWM, reset through /proc/self/clear_refs) above the resident set at entry; large torch CPU
    allocations are mmap-backed, so they show up in and leave the resident set exactly.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self._base = _vm_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak = _vm_hwm_bytes() - self._base
        return False


def write_results(name: str, payload: dict) -> Path:
    """Write `payload` plus provenance to bench/results/<name>.json (atomic) and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"provenance": provenance(), **payload}, indent=2, default=str))
    os.replace(tmp, path)
    return path
