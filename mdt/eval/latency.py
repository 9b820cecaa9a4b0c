"""Warm latency: the median wall time of repeated calls after warm-up calls (first calls pay for lazy
initialisation, allocator growth and kernel selection, which a served model pays once)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def warm_latency(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Call `fn` `warmup` times untimed, then `repeats` times timed (CUDA synchronised around each call).

    Returns {"median_s", "min_s", "max_s", "repeats", "warmup", "times_s"}."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "warmup": warmup, "times_s": times}
