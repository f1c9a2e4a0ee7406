"""Median time of a CUDA graph's replay, for the benchmark scripts in this folder."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_replay_us(step: Callable[[], object], replays: int = 20, warmups: int = 1,
                    before_each: Callable[[], object] | None = None) -> float:
    """Capture `step` (after `warmups` eager runs, which compile its kernels) in a CUDA graph and return
    the median microseconds of a replay; `before_each` runs (untimed) before every timed replay."""
    for _ in range(warmups):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        if before_each is not None:
            before_each()
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[replays // 2]
