"""Timing helper shared by the GPU sections: median of CUDA-event timings after warm-up."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of `fn()` on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
