"""JSON-lines training log and atomic JSON writes for the run folder."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class JsonlLog:
    """Append one JSON object per line to `path` (`train_log.jsonl`); each line gets a `time` field.

    Lines are flushed as they are written so a killed run keeps its log. Disabled (no file) when
    `path` is None, which is what non-zero ranks use.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._fh = open(self.path, "a", encoding="utf-8") if self.path is not None else None

    def write(self, event: str, **fields) -> None:
        if self._fh is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._fh.write(json.dumps(record, default=_jsonable) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_json_atomic(path: str | Path, payload) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    os.replace(tmp, path)
    return path


def _jsonable(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
