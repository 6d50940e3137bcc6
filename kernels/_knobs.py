"""Design knobs of the kernels, read from the environment per call (so a benchmark can time two designs side by
side in one process): one reader, one error message."""
from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """The value of environment variable `name`, which must be one of `choices`; `default` when unset."""
    v = os.environ.get(name)
    if v is None:
        return default
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
    return v
