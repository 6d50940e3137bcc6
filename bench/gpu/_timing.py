"""Helpers shared by the GPU sections: CUDA-event and CUDA-graph timings, per-kernel breakdowns, env knobs."""
from __future__ import annotations

import contextlib
import os
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


def graph_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Milliseconds per call of `fn()` replayed as one captured CUDA graph: the GPU's own time, host overhead
    (Python, dispatch, kernel-launch latency) removed. The lent H100 runs in a VM whose launch path costs
    ~30 us per torch op, so at 4096 tokens every adapter contestant measured 0.5-1.6 ms of host time under
    do_bench while its kernels take tens of us; both numbers are reported, this one is the kernels'."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(times)


def queued_ms(fn, reps: int = 10, warmup: int = 3) -> dict:
    """Milliseconds per call of `fn()` on the GPU without a CUDA graph, for steps that cannot be captured: the
    stream is first held by a GPU spin (torch.cuda._sleep) long enough for the host to enqueue all `reps` calls,
    so the events around them time the GPU's work alone, back to back, not the host's launch rate (the lent
    VM's launch path is slow enough to bound an eager step). {"ms", "host_ms": enqueue time per call,
    "queued": whether the spin outlasted the enqueueing, i.e. the number is the GPU's}."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    guess_ms = (time.perf_counter() - t) * 1e3
    spin_ms = 2.0 * reps * guess_ms + 20.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(spin_ms * 1e-3 * 2.0e9))  # cycles; at most 2 GHz on these cards: spins >= spin_ms
    start.record()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host_ms = (time.perf_counter() - t) * 1e3
    queued = not start.query()  # the spin still runs: every call was enqueued before the first one started
    end.record()
    end.synchronize()
    return {"ms": start.elapsed_time(end) / reps, "host_ms": host_ms / reps, "queued": bool(queued)}


def kernel_breakdown(fn, steps: int = 3, top: int = 12) -> list[dict]:
    """Per-kernel GPU time of `fn()` from torch.profiler (CUPTI): [{name, calls_per_step, us_per_step}], largest
    first. Says where a step's GPU time goes when the totals disappoint (host-side time is not in it)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if us and ev.count:
            rows.append({"name": ev.key[:160], "calls_per_step": ev.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


@contextlib.contextmanager
def env_vars(**values):
    """Set environment variables for a block (the kernels read their design knobs per call), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
