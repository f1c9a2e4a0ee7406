import sys, os
sys.path.insert(0, os.getcwd())
import torch
from gpt_fast_mixtral.kernels import moe
D, I, E, L = 4096, 14336, 8, 6
dev = "cuda"
torch.manual_seed(0)
def timed(fn, label, nbytes):
    for _ in range(2):
        for j in range(L): fn(j)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(L): fn(j)
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1000 / L)
    ts.sort(); us = ts[len(ts) // 2]
    print(f"{label:50} {us:9.1f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)

import triton, triton.language as tl
from gpt_fast_mixtral.kernels.moe import dequant
@triton.jit
def gate_up_blocked(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, experts_ptr, top_k, dim, inter,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    slot = tl.program_id(0)
    ib = tl.program_id(1)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    token = slot // top_k
    blk = tl.arange(0, BLOCK_I)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    base = expert * inter * dim + ib.to(tl.int64) * BLOCK_I * dim
    gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
    up = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        x = tl.load(x_ptr + token * dim + d0 + tl.arange(0, BLOCK_D)).to(tl.float32)
        off = base + (d0 // BLOCK_D) * (BLOCK_I * BLOCK_D) + blk
        w1 = dequant(tl.load(w1_ptr + off), tl.float32, True)
        w3 = dequant(tl.load(w3_ptr + off), tl.float32, True)
        gate += tl.sum(w1 * x[None, :], axis=1)
        up += tl.sum(w3 * x[None, :], axis=1)
    gate *= tl.load(s1_ptr + expert * inter + offs_i).to(tl.float32)
    up *= tl.load(s3_ptr + expert * inter + offs_i).to(tl.float32)
    tl.store(h_ptr + slot * inter + offs_i, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty))
layers = []
for j in range(L):
    w1 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev)
    w3 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev)
    w2 = torch.randint(-127, 128, (E, D, I), dtype=torch.int8, device=dev)
    layers.append(dict(w1=w1, w3=w3, w2=w2, b1=moe.block_rows(w1, (8, 512)), b3=moe.block_rows(w3, (8, 512))))
sc = (torch.full((E, I), 1e-3, device=dev, dtype=torch.bfloat16), torch.full((E, D), 1e-3, device=dev, dtype=torch.bfloat16), torch.full((E, I), 1e-3, device=dev, dtype=torch.bfloat16))
x1 = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
ids1 = torch.tensor([[2, 5]], device=dev)
rw1 = torch.tensor([[0.6, 0.4]], device=dev, dtype=torch.bfloat16)
c = moe.DEFAULT_CONFIG
a = moe.fused_moe(x1, layers[0]["w1"], layers[0]["w2"], layers[0]["w3"], rw1, ids1, sc)
b = moe.fused_moe(x1, layers[0]["b1"], layers[0]["w2"], layers[0]["b3"], rw1, ids1, sc, w13_block=(8, 512))
print("decode rel diff", ((a.float() - b.float()).norm() / a.float().norm()).item())
nb = 3 * 2 * I * D
timed(lambda j: moe.fused_moe(x1, layers[j]["w1"], layers[j]["w2"], layers[j]["w3"], rw1, ids1, sc), "decode rowmajor", nb)
timed(lambda j: moe.fused_moe(x1, layers[j]["b1"], layers[j]["w2"], layers[j]["b3"], rw1, ids1, sc, w13_block=(8, 512)), "decode blocked", nb)
h = torch.empty(2, I, device=dev, dtype=torch.bfloat16)
e32 = ids1.flatten().to(torch.int32)
timed(lambda j: gate_up_blocked[(2, I // 8)](x1, layers[j]["b1"], layers[j]["b3"], sc[0], sc[2], h, e32, 2, D, I, BLOCK_I=8, BLOCK_D=512, num_warps=4), "experimental gate_up on blocked", 2 * 2 * I * D)
timed(lambda j: moe._gate_up_gemv_kernel[(2, I // 8)](x1, layers[j]["b1"], layers[j]["b3"], sc[0], sc[2], h, e32, 2, 0, D, I, D, I * D, D, I, I, HAS_SCALES=True, MAGIC=True, BLOCK_I=8, BLOCK_D=512, PERSISTENT=False, BR=8, BC=512, num_warps=4), "package gate_up gemv on blocked", 2 * 2 * I * D)
timed(lambda j: moe._gate_up_gemv_kernel[(2, I // 8)](x1, layers[j]["w1"], layers[j]["w3"], sc[0], sc[2], h, e32, 2, 0, D, I, D, I * D, D, I, I, HAS_SCALES=True, MAGIC=True, BLOCK_I=8, BLOCK_D=512, PERSISTENT=False, BR=0, BC=0, num_warps=4), "package gate_up gemv rowmajor 512", 2 * 2 * I * D)
import dataclasses
for bd in (512, 1024):
    cc = dataclasses.replace(c, gemv_block_d=bd)
    timed(lambda j: moe.fused_moe(x1, layers[j]["w1"], layers[j]["w2"], layers[j]["w3"], rw1, ids1, sc, config=cc), f"decode rowmajor gemv_block_d {bd}", nb)

T = 2048
xp = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
idp = torch.stack([torch.randperm(E, device=dev)[:2] for _ in range(T)])
rwp = torch.full((T, 2), 0.5, device=dev, dtype=torch.bfloat16)
a = moe.fused_moe(xp, layers[0]["w1"], layers[0]["w2"], layers[0]["w3"], rwp, idp, sc)
b = moe.fused_moe(xp, layers[0]["b1"], layers[0]["w2"], layers[0]["b3"], rwp, idp, sc, w13_block=(8, 512))
print("prefill rel diff", ((a.float() - b.float()).norm() / a.float().norm()).item())
timed(lambda j: moe.fused_moe(xp, layers[j]["w1"], layers[j]["w2"], layers[j]["w3"], rwp, idp, sc), "prefill 2048 rowmajor", nb)
timed(lambda j: moe.fused_moe(xp, layers[j]["b1"], layers[j]["w2"], layers[j]["b3"], rwp, idp, sc, w13_block=(8, 512)), "prefill 2048 blocked", nb)
