"""Progress bar for the training loop (tqdm, on stderr): step, loss, examples/s, tokens/s."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.total, self.initial = total, initial

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        return self

    def update(self, rec, examples_per_s: float, tokens_per_s: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", ex_s=f"{examples_per_s:.1f}",
                             tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(1)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
