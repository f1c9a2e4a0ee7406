# Session 25 (nvidia-h200), with results/down_streamed_splits_session25.patch applied: PYTHONPATH=. python3 benchmarks/results/down_streamed_micro_session25.py
import os, torch, time
from gpt_fast_mixtral.kernels import moe
torch.manual_seed(0)
dev = "cuda"
E, I, D = 8, 14336, 4096
L = 8
x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
layers = []
for _ in range(L):
    w1, w3 = (moe.block_rows(torch.randint(-127, 128, (E, I, D), device=dev, dtype=torch.int8), (8, 512)) for _ in range(2))
    w2 = torch.randint(-127, 128, (E, D, I), device=dev, dtype=torch.int8)
    scales = tuple(torch.rand(E, n, device=dev, dtype=torch.bfloat16) * 1e-3 for n in (I, D, I))
    ids = torch.randperm(E, device=dev)[:2].view(1, 2)
    layers.append((w1, w2, w3, scales, ids))
rw = torch.tensor([[0.6, 0.4]], device=dev, dtype=torch.bfloat16)
def chain(x):
    for w1, w2, w3, sc, ids in layers:
        x = moe.fused_moe(x, w1, w2, w3, rw, ids, sc, w13_block=(8, 512)) * 0.01
    return x
for mode, nap in [("0", "0"), ("1", "256"), ("1", "2000"), ("0", "0"), ("1", "256"), ("1", "2000")]:
    os.environ["SPL"] = mode; os.environ["SPL_NAP"] = nap
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(x)
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        time.sleep(0.3)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20): g.replay()
        e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / 20 / L)
    print(f"SPLTIME SPL={mode} NAP={nap}: us per MoE layer {sorted(ts)[2]:.1f} ({[round(t,1) for t in ts]})", flush=True)
