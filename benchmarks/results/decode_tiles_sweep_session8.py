"""Decode MoE and int8 linear tiles again after the prmt dequantisation (session 8): whole fused_moe
(gate_up + down + sum) per layer, 8 layers of Mixtral-8x7B int8 experts (w1 / w3 in 8 x 512 blocks)
rotated in one CUDA graph; linears 32 copies rotated."""
import dataclasses, torch
from gpt_fast_mixtral.kernels import moe, linear
from gpt_fast_mixtral.quantize import INT8_W13_BLOCK

dev = "cuda"
L, E, I, D = 8, 8, 14336, 4096
g = torch.Generator(device=dev).manual_seed(0)
def rnd(*shape):
    return torch.randint(-127, 127, shape, dtype=torch.int8, device=dev, generator=g)
w1s = [moe.block_rows(rnd(E, I, D), INT8_W13_BLOCK) for _ in range(L)]
w3s = [moe.block_rows(rnd(E, I, D), INT8_W13_BLOCK) for _ in range(L)]
w2s = [rnd(E, D, I) for _ in range(L)]
sc = (torch.rand(E, I, device=dev, dtype=torch.bfloat16) * 1e-3, torch.rand(E, D, device=dev, dtype=torch.bfloat16) * 1e-3,
      torch.rand(E, I, device=dev, dtype=torch.bfloat16) * 1e-3)
ids = [torch.randperm(E, device=dev)[:2].view(1, 2).contiguous() for _ in range(L)]
rw = torch.tensor([[0.6, 0.4]], device=dev, dtype=torch.bfloat16)
x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)

def timed(step, reps=15):
    step(); torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); graph.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]

base = moe.DEFAULT_CONFIG
ref = moe.fused_moe(x, w1s[0], w2s[0], w3s[0], rw, ids[0], sc, base, INT8_W13_BLOCK).float()
variants = {"default": {}, "gate_up_i16": dict(gemv_block_i=16), "gate_up_w8": dict(gemv_warps=8),
            "down_o16": dict(gemv_down_block_o=16), "down_o4": dict(gemv_down_block_o=4),
            "split2": dict(gemv_split=2), "split8": dict(gemv_split=8), "down_i1024": dict(gemv_down_block_i=1024),
            "down_o16_i256": dict(gemv_down_block_o=16, gemv_down_block_i=256), "down_o4_i1024": dict(gemv_down_block_o=4, gemv_down_block_i=1024)}
for name, change in variants.items():
    c = dataclasses.replace(base, **change)
    try:
        got = moe.fused_moe(x, w1s[0], w2s[0], w3s[0], rw, ids[0], sc, c, INT8_W13_BLOCK).float()
        err = ((got - ref).norm() / ref.norm()).item()
        t = timed(lambda: [moe.fused_moe(x, w1s[i], w2s[i], w3s[i], rw, ids[i], sc, c, INT8_W13_BLOCK) for i in range(L)]) / L
        print(f"moe {name:14} {t:7.2f} us/layer  err {err:.1e}", flush=True)
    except Exception as e:
        print("moe", name, "failed", repr(e)[:200], flush=True)

del w1s, w3s, w2s
for lname, n in (("wo", 4096), ("wqkv", 6144), ("head", 32000)):
    copies = 32 if n < 10000 else 4
    ws = [rnd(n, D) for _ in range(copies)]
    ss = torch.rand(n, device=dev, dtype=torch.bfloat16) * 1e-3
    for cname, cfg in (("n4_k1024", linear.LinearConfig()), ("n8_k512", linear.LinearConfig(gemv_block_n=8, gemv_block_k=512)),
                       ("n2_k2048", linear.LinearConfig(gemv_block_n=2, gemv_block_k=2048)),
                       ("n4_k512", linear.LinearConfig(gemv_block_k=512)), ("n8_k1024_w8", linear.LinearConfig(gemv_block_n=8, gemv_warps=8))):
        t = timed(lambda: [linear.int8_linear(x, w, ss, cfg) for w in ws]) / copies
        print(f"linear {lname:5} {cname:12} {t:6.2f} us  {n * D / t / 1e6:5.2f} TB/s", flush=True)
