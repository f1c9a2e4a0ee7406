"""Session 40: the decode attention (kernels.attention.rope_cache_attention) alone, Mixtral-8x7B's shape, 32 layers
chained in a CUDA graph (PDL on an H200), us per call by position, with and without PREFETCH_CHUNK.
Run from the repository root: PYTHONPATH=. python3 benchmarks/results/attention_micro_session40.py
The other rows of h200_s40_router_attention.log (tile slots, warps, pipeline stages, single span) were run with
temporary module constants for those launch settings, not kept in the code."""
import sys

import torch

from gpt_fast_mixtral import model as M
from gpt_fast_mixtral.kernels import attention

sys.path.insert(0, "scripts")
import benchmark as B  # noqa: E402

dev = torch.device("cuda")
L, H, KV, D, S = 32, 32, 8, 128, 2048
table = M.rope_tables(B.CONFIGS["mixtral-8x7b"], S, dev)
qkv = [torch.randn(1, (H + 2 * KV) * D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
kc = [torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
vc = [torch.randn(1, KV, S, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
cnt = [torch.zeros(1, KV, dtype=torch.int32, device=dev) for _ in range(L)]
pos = torch.zeros(1, dtype=torch.int64, device=dev)
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)


def step():
    for i in range(L):
        attention.rope_cache_attention(qkv[i], table[..., 0], table[..., 1], kc[i], vc[i], pos, H, KV, D, None,
                                       cnt[i], release_after_first_tile=True)


POSITIONS = (8, 60, 100, 150, 190, 200, 250, 500, 1000)
print("prefetch | us per call at positions", *POSITIONS)
for prefetch in (False, True):
    attention.PREFETCH_CHUNK = prefetch
    pos.fill_(100)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    res = []
    for p in POSITIONS:
        pos.fill_(p)
        times = []
        for _ in range(7):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1000 / L)
        res.append(sorted(times)[3])
    print(prefetch, " ".join(f"{r:6.2f}" for r in res))
