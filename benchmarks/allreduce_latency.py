"""Latency of one decode-sized all-reduce, by method, inside a CUDA graph (as the decode step runs them).

    torchrun --standalone --nproc-per-node N benchmarks/allreduce_latency.py [--elements 4096 32768] [--json OUT]

For each method (push, one-shot, nccl) and size, rank 0 prints microseconds per all-reduce:
- "back to back": a graph of 64 all-reduces in a row: what one costs when every rank arrives at the same
  time (kernel, NVLink and launch latency);
- "between work": the same 64 with a fixed matrix product (~`--work-us`) between consecutive all-reduces,
  like the layers of a decode step: the extra time over the work alone, per all-reduce.
The tensor-parallel decode step of Mixtral runs 64 all-reduces of 4096 bf16 elements (batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from graph_timing import graph_replay_us  # noqa: E402

from gpt_fast_mixtral import tp  # noqa: E402

CALLS = 64


def all_reduce(x: torch.Tensor, index: int) -> torch.Tensor:
    """What a tensor-parallel block runs after its attention (buffer 0) and its experts (buffer 1) when it
    does not fuse them: the one-shot op where enabled and fitting, else NCCL."""
    return tp.all_reduce(x, None, index % 2)


def graph_us_all(step) -> float:
    """Median microseconds of a replay of a CUDA graph of `step`, the ranks starting each replay together."""
    return graph_replay_us(step, replays=30, warmups=2, before_each=dist.barrier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, nargs="*", default=[4096, 32768])
    parser.add_argument("--methods", nargs="*", default=["push", "one-shot", "nccl"], choices=tp.ALL_REDUCES)
    parser.add_argument("--work-us", type=float, default=20.0, help="about how long the product between takes")
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    tp.init_process_group(device, "nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    side = 2048
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    matmul_us = graph_us_all(lambda: a @ b)
    repeats = max(1, round(options.work_us / matmul_us))
    rows = []
    for method in options.methods:
        tp._ONE_SHOT.clear()
        if method != "nccl":
            tp.enable_one_shot_all_reduce((torch.bfloat16,), method=method)
        for elements in options.elements:
            x = torch.randn(elements, device=device, dtype=torch.bfloat16)

            def chain(x=x):  # independent inputs: the stream still runs them one after another
                return [all_reduce(x, index) for index in range(CALLS)]

            def between(x=x):
                outs = []
                for index in range(CALLS):
                    for _ in range(repeats):
                        a @ b
                    outs.append(all_reduce(x, index))
                return outs

            def work_only():
                for _ in range(CALLS * repeats):
                    a @ b

            chain_us = graph_us_all(chain) / CALLS
            extra_us = (graph_us_all(between) - graph_us_all(work_only)) / CALLS
            rows.append(dict(method=method, elements=elements, world_size=world_size, chain_us=chain_us,
                             between_work_us=extra_us, work_us=matmul_us * repeats))
            if rank == 0:
                print(f"W={world_size} {method:8} {elements:6} elements: {chain_us:6.2f} us per all-reduce back to "
                      f"back, {extra_us:6.2f} us between {matmul_us * repeats:.1f} us of work", flush=True)
    if rank == 0 and options.json:
        options.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                            "command": " ".join(sys.argv), "rows": rows}, indent=1))
    tp.leave_process_group()


if __name__ == "__main__":
    main()
