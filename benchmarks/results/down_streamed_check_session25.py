# Session 25 (nvidia-h200), with results/down_streamed_splits_session25.patch applied: PYTHONPATH=. python3 benchmarks/results/down_streamed_check_session25.py
"""Bit-for-bit check of the streamed down (SPL=1) against the PDL wait (SPL=0), eager and in a CUDA graph."""
import os, sys, torch
from gpt_fast_mixtral.kernels import moe
torch.manual_seed(0)
dev = "cuda"
fails = 0
def run(x, w1, w2, w3, rw, ids, scales, block):
    return moe.fused_moe(x, w1, w2, w3, rw, ids, scales, w13_block=block)
cases = [  # (E, inter, dim, tokens, k, int8, block, neg)
    (8, 14336, 4096, 1, 2, True, (8, 512), False),
    (8, 7168, 4096, 1, 2, True, (8, 512), False),
    (8, 3584, 4096, 1, 2, True, (8, 512), False),
    (8, 14336, 4096, 1, 2, True, (8, 512), True),
    (8, 14336, 4096, 1, 3, True, (8, 512), False),
    (5, 1000, 384, 1, 2, True, None, False),
    (3, 776, 256, 3, 1, True, None, False),
    (4, 1536, 512, 1, 3, False, None, False),
    (8, 14336, 4096, 1, 2, False, None, False),
]
for E, I, D, T, K, q, block, neg in cases:
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    if q:
        w1, w3 = (torch.randint(-127, 128, (E, I, D), device=dev, dtype=torch.int8) for _ in range(2))
        w2 = torch.randint(-127, 128, (E, D, I), device=dev, dtype=torch.int8)
        scales = tuple(torch.rand(E, n, device=dev, dtype=torch.bfloat16) * 1e-3 for n in (I, D, I))
        if block:
            w1, w3 = moe.block_rows(w1, block), moe.block_rows(w3, block)
    else:
        w1, w3 = (torch.randn(E, I, D, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2))
        w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * 0.02
        scales, block = None, None
    ids = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).to(torch.int64)
    if neg:
        ids[0, 0] = -1
    rw = torch.softmax(torch.randn(T, K, device=dev), -1).to(torch.bfloat16)
    os.environ["SPL"] = "0"
    ref = run(x, w1, w2, w3, rw, ids, scales, block)
    os.environ["SPL"] = "1"
    outs = [run(x, w1, w2, w3, rw, ids, scales, block) for _ in range(30)]
    torch.cuda.synchronize()
    counts = moe._STREAM_COUNTS.get(0)
    bad = sum(int(not torch.equal(o, ref)) for o in outs)
    # graph
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(x, w1, w2, w3, rw, ids, scales, block)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        gout = run(x, w1, w2, w3, rw, ids, scales, block)
    gbad = 0
    for _ in range(100):
        g.replay()
        torch.cuda.synchronize()
        gbad += int(not torch.equal(gout, ref))
    czero = counts is not None and int(counts.abs().sum()) == 0
    ok = bad == 0 and gbad == 0 and czero
    fails += not ok
    print(f"SPLCHECK E={E} I={I} D={D} T={T} K={K} int8={q} block={block} neg={neg}: eager bad {bad}/30, graph bad {gbad}, counters zero {czero}, max|ref| {ref.float().abs().max():.3g}")
print("SPLCHECK fails", fails)
