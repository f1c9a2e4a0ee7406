# Session 28 (nvidia-h200): 8 int8 Mixtral MoE layers (gate_up, down, block end with PDL) in a CUDA graph, us a layer:
# the block-end kernel (base) against down programs owning whole output rows (_down_rows_kernel of
# results/down_rows_session28.patch) in several tiles. The log's timings ran before the kernel also stored the next
# norm's halves (out * weight, squares); with the patch as archived, the rows variant takes the Prenormed's `scaled`.
# PYTHONPATH=. python3 benchmarks/results/down_rows_micro_session28.py base rows:8,1024,3,4 ...   (block_o, block_i, stages, warps)
import dataclasses, statistics, sys, time
import torch
from gpt_fast_mixtral.kernels import moe
torch.manual_seed(0)
dev = "cuda"
E, I, D, L = 8, 14336, 4096, 8
x0 = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
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

def make(cfg):
    def chain(x):
        r = res
        for w1, w2, w3, sc, ids in layers:
            r, normed = moe.fused_moe(x, w1, w2, w3, rw, ids, sc, config=cfg, w13_block=(8, 512),
                                      end=moe.BlockEnd(r, nw, 1e-5))
            x = normed.scaled if isinstance(normed, moe.Prenormed) else normed
        return x
    return chain

def timeit(fn, label):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x0)
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
    return statistics.median(ts)

# correctness of the rows path against the block end on the same inputs (one layer)
w1, w2, w3, sc, ids = layers[0]
a = moe.fused_moe(x0, w1, w2, w3, rw, ids, sc, config=dataclasses.replace(moe.DEFAULT_CONFIG, gemv_down_rows=False), w13_block=(8, 512), end=moe.BlockEnd(res, nw, 1e-5))[0]
b = moe.fused_moe(x0, w1, w2, w3, rw, ids, sc, config=dataclasses.replace(moe.DEFAULT_CONFIG, gemv_down_rows=True), w13_block=(8, 512), end=moe.BlockEnd(res, nw, 1e-5))[0]
print("rows vs block end: max abs diff", (a.float() - b.float()).abs().max().item(), "max", a.float().abs().max().item(), flush=True)
results = []
for spec in sys.argv[1:]:
    if spec == "base":
        cfg = dataclasses.replace(moe.DEFAULT_CONFIG, gemv_down_rows=False)
    else:
        bo, bi, st, w = (int(v) for v in spec.split(":")[1].split(","))
        cfg = dataclasses.replace(moe.DEFAULT_CONFIG, gemv_down_rows=True, gemv_rows_block_o=bo, gemv_rows_block_i=bi,
                                  gemv_rows_stages=st, gemv_rows_warps=w)
    try:
        results.append((spec, timeit(make(cfg), spec)))
    except Exception as e:  # a tile that does not fit
        print(f"MICRO {spec}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
print("\nvariant | us a layer")
for spec, t in results:
    print(f"{spec} | {t:.1f}")
