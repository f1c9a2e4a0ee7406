# Session 27 (nvidia-h200): 8 int8 Mixtral MoE layers (gate_up, down, block end with PDL) in a CUDA graph, us a layer; with
# results/oracles_session27.patch applied, ORC_* pick the oracle. NAME=x [READ=1] PYTHONPATH=. python3 benchmarks/results/moe_chain_micro_session27.py
import os, sys, torch, time, statistics
sys.path.insert(0, ".")
from gpt_fast_mixtral.kernels import moe
import triton, triton.language as tl
torch.manual_seed(0)
dev = "cuda"
E, I, D = 8, 14336, 4096
L = 8
x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
res = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
nw = torch.ones(D, device=dev, dtype=torch.bfloat16)
layers = []
for _ in range(L):
    w1, w3 = (moe.block_rows(torch.randint(-127, 128, (E, I, D), device=dev, dtype=torch.int8), (8, 512)) for _ in range(2))
    w2 = torch.randint(-127, 128, (E, D, I), device=dev, dtype=torch.int8)
    scales = tuple(torch.rand(E, n, device=dev, dtype=torch.bfloat16) * 1e-3 for n in (I, D, I))
    ids = torch.randperm(E, device=dev)[:2].view(1, 2).to(torch.int32)
    layers.append((w1, w2, w3, scales, ids))
rw = torch.tensor([[0.6, 0.4]], device=dev, dtype=torch.bfloat16)
def chain(x):
    r = res
    if os.environ.get("PARTIALS") == "1":
        for w1, w2, w3, sc, ids in layers:
            y = moe.fused_moe_partials(x, w1, w2, w3, rw, ids, sc, w13_block=(8, 512))
        return y
    for w1, w2, w3, sc, ids in layers:
        r, x = moe.fused_moe(x, w1, w2, w3, rw, ids, sc, w13_block=(8, 512), end=moe.BlockEnd(r, nw, 1e-5))
    return x
@triton.jit
def _read(p, out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0); acc = tl.zeros((BLOCK,), tl.int32)
    for s in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        acc += tl.load(p + s + tl.arange(0, BLOCK)).to(tl.int32)
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)
nbytes = 2 * 3 * I * D
bufs = [torch.randint(-127, 128, (nbytes,), device=dev, dtype=torch.int8) for _ in range(L)]
rout = torch.empty(132 * 8 * 4096, device=dev, dtype=torch.int32)
def reads(x):
    for b in bufs:
        _read[(132 * 8,)](b, rout, nbytes, BLOCK=4096, num_warps=4)
    return x
def timeit(fn, label):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        time.sleep(0.3)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(20): g.replay()
        e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / 20 / L)
    print(f"MICRO {label}: us per layer {statistics.median(ts):.1f} ({[round(t,1) for t in ts]})", flush=True)
label = os.environ.get("NAME", "base")
timeit(chain, label)
if os.environ.get("READ") == "1":
    timeit(reads, "plain read 352 MB")
