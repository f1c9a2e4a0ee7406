"""Session 34 (h200_s34_grouped_tile_sweep.log): tile sweep of the int8 prefill grouped GEMMs (int8 weights, w1 / w3
in 8 x 512 blocks, row-scaled float16 activations) at T tokens of random top-2 routing over Mixtral's 8 experts,
each kernel timed alone (CUDA events, median of 5); PROFILE=1 adds a profile of the whole fused_moe.
Command: WHICH=gate_up|down [PROFILE=1] [T=2048] PYTHONPATH=. python3 benchmarks/results/grouped_tile_sweep_session34.py"""
import os, statistics, sys, itertools
import torch, triton
sys.path[:0] = ["."]
from gpt_fast_mixtral.kernels import moe as M
dev = torch.device("cuda")
E, D, I, K = 8, 4096, 14336, 2
T = int(os.environ.get("T", "2048"))
torch.manual_seed(0)
w1 = M.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev), (8, 512))
w3 = M.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev), (8, 512))
w2 = torch.randint(-127, 128, (E, D, I), dtype=torch.int8, device=dev)
s1, s3 = ((torch.rand(E, I, device=dev) * 2e-4 + 1e-4).bfloat16() for _ in range(2))
s2 = (torch.rand(E, D, device=dev) * 2e-4 + 1e-4).bfloat16()
x = torch.randn(T, D, device=dev).bfloat16()
rw, idx = torch.topk(torch.randn(T, E, device=dev).softmax(-1), K, dim=-1)
rw = rw.bfloat16().flatten().contiguous()
ids = idx.reshape(-1).contiguous()
x16, xs = M.rows_to_fp16(x)
h = torch.randn(T * K, I, device=dev).to(torch.float16)
hs = torch.ones(T * K, device=dev)
y = torch.empty(T * K, D, dtype=torch.float32, device=dev)

def t(fn):
    fn(); torch.cuda.synchronize()
    r = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); r.append(a.elapsed_time(b))
    return statistics.median(r)

groups = {}
def grp(bm):
    if bm not in groups:
        groups[bm] = M.group_slots(ids, E, K, bm)
    return groups[bm]

def gate_up(swap, bm, bn, bk, warps, stages):
    order, _, _, slot_token, te, tr, tre = grp(bm)
    nm = te.numel()
    hh = torch.empty(T * K, I, dtype=torch.float16, device=dev)
    return lambda: M._grouped_gate_up_kernel[(nm * triton.cdiv(I, bn),)](
        x16, w1, w3, s1, s3, hh, xs, slot_token, te, tr, tre, E, nm, D, I, x16.stride(0), w1.stride(0), w1.stride(1),
        s1.stride(0), hh.stride(0), HAS_SCALES=True, PRECISION="tf32", MAGIC=True, EVEN_K=True, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=min(bk, 512), SWAP_AB=swap, ROW_SCALE=True, BR=8, BC=512, num_warps=warps, num_stages=stages)

def down(swap, bm, bn, bk, warps, stages):
    order, _, _, slot_token, te, tr, tre = grp(bm)
    nm = te.numel()
    return lambda: M._grouped_down_kernel[(nm * triton.cdiv(D, bn),)](
        h, w2, s2, y, order, rw, hs, te, tr, tre, E, nm, D, I, h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0),
        y.stride(0), HAS_SCALES=True, PRECISION="tf32", MAGIC=True, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        SWAP_AB=swap, ROW_SCALE=True, num_warps=warps, num_stages=stages)

which = os.environ.get("WHICH", "gate_up,down").split(",")
res = []
shapes = [(128, 128), (128, 64), (64, 128), (64, 256), (128, 256), (256, 128)]
for kern in which:
    for swap, (bm, bn), bk, warps, stages in itertools.product([False, True], shapes, [64, 128], [4, 8], [3, 4]):
        try:
            fn = (gate_up if kern == "gate_up" else down)(swap, bm, bn, bk, warps, stages)
            ms = t(fn)
        except Exception as exc:
            continue
        res.append((kern, ms, swap, bm, bn, bk, warps, stages))
        print(f"{kern} swap={int(swap)} bm={bm} bn={bn} bk={bk} w={warps} st={stages}: {ms:.3f} ms", flush=True)
print("\nBEST")
for kern in which:
    rk = sorted(r for r in res if r[0] == kern)[:6]
    for r in rk:
        print(f"{r[0]} {r[1]:.3f} ms swap={int(r[2])} bm={r[3]} bn={r[4]} bk={r[5]} w={r[6]} st={r[7]}")
cur = [r for r in res if r[2:] == (False, 128, 128, 64, 8, 3)]
print("current config:", [(r[0], round(r[1], 3)) for r in cur], "and down bn=128:", [(r[0], round(r[1], 3)) for r in res if r[0]=="down" and r[2:]==(False,128,128,64,8,3)])

if os.environ.get("PROFILE") == "1":
    from torch.profiler import profile, ProfilerActivity
    f = lambda: M.fused_moe(x, w1, w2, w3, rw.view(T, K), idx, (s1, s2, s3), w13_block=(8, 512))
    f(); torch.cuda.synchronize()
    print("fused_moe whole:", t(f))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
