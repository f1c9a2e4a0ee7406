"""Session 14: the MoE layer (fused_moe, gate_up + down) then the block's end (residual add + next norm):
Inductor's kernel after fused_moe, against the down kernel's last program doing it (BlockEnd), with and
without a register cap. 8 layers of weights rotated in one CUDA graph; us per layer."""
import sys
import torch
from gpt_fast_mixtral.kernels import moe
from gpt_fast_mixtral.model import rms_norm
from gpt_fast_mixtral.quantize import quantize_per_channel

D, I, E, L = 4096, 14336, 8, 8
dev = "cuda"
kinds = sys.argv[1:] or ["int8", "bf16"]


def make(kind):
    layers = []
    for i in range(L):
        w1, w3 = (torch.randn(E, I, D, device=dev, dtype=torch.bfloat16) * D ** -0.5 for _ in range(2))
        w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
        if kind == "int8":
            (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
            del w1, w2, w3
            q1, q3 = moe.block_rows(q1, (8, 512)), moe.block_rows(q3, (8, 512))
            layers.append(dict(w=(q1, q2, q3), scales=(s1, s2, s3), block=(8, 512)))
        else:
            layers.append(dict(w=(w1, w2, w3), scales=None, block=None))
        torch.cuda.empty_cache()
    return layers


def timed(step):
    step(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / L)
    times.sort()
    return times[len(times) // 2]


epilogue = torch.compile(lambda res, e, w: (res + e, rms_norm(res + e, w, 1e-5)))
for kind in kinds:
    layers = make(kind)
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
    nw = torch.rand(D, device=dev, dtype=torch.bfloat16) + 0.5
    rw = torch.tensor([[0.6, 0.4]], device=dev, dtype=torch.bfloat16)
    ids = [torch.tensor([[i % E, (i + 3) % E]], device=dev) for i in range(L)]
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    cfgs = {"end": moe.MoEConfig(end_block_16bit=True), "end_cap64": moe.MoEConfig(end_max_registers=64, end_block_16bit=True)}

    def plain_moe():
        for i, l in enumerate(layers):
            moe.fused_moe(x, *l["w"], rw, ids[i], l["scales"], w13_block=l["block"])

    def plain():
        for i, l in enumerate(layers):
            e = moe.fused_moe(x, *l["w"], rw, ids[i], l["scales"], w13_block=l["block"])
            epilogue(res, e, nw)

    def ended(cfg):
        def step():
            for i, l in enumerate(layers):
                moe.fused_moe(x, *l["w"], rw, ids[i], l["scales"], config=cfg, w13_block=l["block"],
                              end=moe.BlockEnd(res, nw, 1e-5, counter))
        return step

    # correctness spot check
    l = layers[0]
    e = moe.fused_moe(x, *l["w"], rw, ids[0], l["scales"], w13_block=l["block"])
    o, n = moe.fused_moe(x, *l["w"], rw, ids[0], l["scales"], w13_block=l["block"], config=cfgs["end"], end=moe.BlockEnd(res, nw, 1e-5, counter))
    print(kind, "check", torch.equal(o, res + e), (n.float() - rms_norm(res + e, nw, 1e-5).float()).abs().max().item(), counter.item())
    rows = []
    for rep in range(2):
        rows += [("moe only", timed(plain_moe)), ("moe + inductor end", timed(plain))]
        for name, cfg in cfgs.items():
            rows.append((name, timed(ended(cfg))))
    for name, t in rows:
        print(f"{kind:5} {name:20} {t:8.2f} us/layer", flush=True)
    del layers
    torch.cuda.empty_cache()
