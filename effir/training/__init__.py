"""`python -m effir.train` internals: config, loop, checkpoints, logs, evaluation around training.

Python API: `run(TrainConfig(...), groups=None)` trains and evaluates as the command does and returns the
metrics dict that it writes to `<output_dir>/metrics.json`.
"""
from .config import TrainConfig


def run(cfg, **kwargs):
    from .runner import run as _run

    return _run(cfg, **kwargs)


__all__ = ["TrainConfig", "run"]
