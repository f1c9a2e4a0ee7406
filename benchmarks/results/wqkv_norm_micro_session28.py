# Session 28 (nvidia-h200): wqkv (6144 x 4096 int8) x 32 weights chained in a CUDA graph with PDL, us a call, with and
# without the input's RMSNorm in the kernel. Ran against temporary hooks in kernels/linear.py, not kept: NORM=1 is
# session 27's in-loop norm (results/finish_in_down_session27.patch's `norm`) and NORM_ORACLE its oracles (1 no norm
# weight, 2 no final 1/rms, 4 no squares); SQ=P is down_rows_session28.patch's `rms` with P random partial sums,
# set through a module dict. TRITON_CACHE_DIR per variant. NAME=x [NORM=1 | SQ=512] PYTHONPATH=. python3 <this>
import os, statistics, sys, time
import torch
from gpt_fast_mixtral.kernels import linear
dev = "cuda"
N, K, L = 6144, 4096, 32
torch.manual_seed(0)
ws = [torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8) for _ in range(L)]
ss = [torch.rand(N, device=dev, dtype=torch.bfloat16) * 1e-3 for _ in range(L)]
nw = torch.rand(K, device=dev, dtype=torch.bfloat16) + 0.5
x0 = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
norm = os.environ.get("NORM") == "1"
if os.environ.get("SQ"):
    linear._SQ_TEST[K] = torch.rand(int(os.environ["SQ"]), device=dev)
def chain(x):
    for w, s in zip(ws, ss):
        y = linear.int8_linear(x, w, s, norm=(nw, 1e-5) if norm else None)
        x = y[:, :K]
    return x
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    chain(x0)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    chain(x0)
for _ in range(3): g.replay()
torch.cuda.synchronize()
ts = []
for _ in range(7):
    time.sleep(0.2)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20): g.replay()
    e1.record(); torch.cuda.synchronize()
    ts.append(e0.elapsed_time(e1) * 1e3 / 20 / L)
k = linear._linear_kernel
regs = [(v.n_regs, v.n_spills, v.metadata.shared) for d in k.device_caches.values() for v in d[0].values()] if hasattr(k, "device_caches") else "?"
print(f"LIN {os.environ.get('NAME')}: us per call {statistics.median(ts):.2f} ({[round(t,2) for t in ts]}) regs/spills/smem {regs}", flush=True)
