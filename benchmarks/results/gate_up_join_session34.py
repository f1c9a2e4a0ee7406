"""Session 34 (h200_s34_gate_up_join.log): the prefill gate_up with one accumulator over interleaved w1 / w3
columns (tl.join of the two dequantised tiles, tl.split of the accumulator), against the landed two-accumulator
kernel (128 x 64, 4 warps) at T tokens; each join timing includes its group_slots (~0.05 ms).
CPU check of the join kernel against PyTorch: TRITON_INTERPRET=1 CHECK=1 python3 <this file>;
GPU: [T=2048] PYTHONPATH=. python3 <this file>"""
import os, statistics, sys, itertools
import torch, triton, triton.language as tl
sys.path[:0] = ["."]
from gpt_fast_mixtral.kernels import moe as M
from gpt_fast_mixtral.kernels.moe import _w13_rows, _w13_col, dequant


@triton.jit
def gu_join_kernel(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, xs_ptr, slot_token_ptr, tile_expert_ptr,
                   tile_row_ptr, tile_end_ptr, num_experts, num_m_tiles, dim, inter, stride_x, stride_we, stride_wi,
                   stride_se, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    pid_m = pid % num_m_tiles
    pid_n = pid // num_m_tiles
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < num_experts:
        rows = tl.load(tile_row_ptr + pid_m) + tl.arange(0, BLOCK_M)
        mask_m = rows < tl.load(tile_end_ptr + pid_m)
        token = tl.load(slot_token_ptr + rows, mask=mask_m, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = _w13_rows(expert, offs_n, dim, stride_we, stride_wi, BR, BC)
        x_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]
        w_off = w_rows[None, :] + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w1 = dequant(tl.load(w1_ptr + w_off, mask=mask_n[None, :], other=0), x.dtype, True)
            w3 = dequant(tl.load(w3_ptr + w_off, mask=mask_n[None, :], other=0), x.dtype, True)
            w = tl.reshape(tl.join(w1, w3), (BLOCK_K, 2 * BLOCK_N))
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_off += _w13_col(k0 + BLOCK_K, BLOCK_K, BR, BC) - _w13_col(k0, BLOCK_K, BR, BC)
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        gate = gate * tl.load(s1_ptr + expert * stride_se + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        up = up * tl.load(s3_ptr + expert * stride_se + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        xs = tl.load(xs_ptr + token, mask=mask_m, other=0.0)
        gate, up = gate * xs[:, None], up * xs[:, None]
        h = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + offs_n[None, :], h,
                 mask=mask_m[:, None] & mask_n[None, :])


def run(x16, xs, w1, w3, s1, s3, ids, K, bm, bn, bk, warps, stages, block):
    E, I, D = w1.shape
    order, _, _, slot_token, te, tr, tre = M.group_slots(ids, E, K, bm)
    nm = te.numel()
    h = torch.zeros(ids.numel(), I, dtype=torch.float16 if x16.is_cuda else torch.float32, device=x16.device)
    gu_join_kernel[(nm * triton.cdiv(I, bn),)](x16, w1, w3, s1, s3, h, xs, slot_token, te, tr, tre, E, nm, D, I,
                                               x16.stride(0), w1.stride(0), w1.stride(1), s1.stride(0), h.stride(0),
                                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BR=block[0], BC=block[1],
                                               num_warps=warps, num_stages=stages)
    run.order = order.long()
    return h


if os.environ.get("CHECK") == "1":
    dev = "cpu"
    E, I, D, T, K = 4, 64, 128, 20, 2
    torch.manual_seed(0)
    w1 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8)
    w3 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8)
    s1, s3 = (torch.rand(E, I) * 1e-2 + 1e-3 for _ in range(2))
    s1, s3 = s1.bfloat16(), s3.bfloat16()
    x = torch.randn(T, D).bfloat16()
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).reshape(-1).contiguous()
    x16, xs = x.float(), torch.ones(T)
    for block in [(0, 0), (8, 32)]:
        b1 = M.block_rows(w1, block) if block[0] else w1
        b3 = M.block_rows(w3, block) if block[0] else w3
        h = run(x16, xs, b1, b3, s1, s3, ids, K, 16, 32, 32, 4, 2, block).float()
        tok = torch.arange(T * K) // K
        g = torch.einsum("nd,nid->ni", x.float()[tok], w1[ids].float()) * s1.float()[ids]
        u = torch.einsum("nd,nid->ni", x.float()[tok], w3[ids].float()) * s3.float()[ids]
        ref = torch.nn.functional.silu(g) * u
        ref = ref[run.order]
        print("block", block, "rel err", ((h - ref).norm() / ref.norm()).item())
    sys.exit()

dev = torch.device("cuda")
E, D, I, K, T = 8, 4096, 14336, 2, int(os.environ.get("T", "2048"))
torch.manual_seed(0)
w1 = M.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev), (8, 512))
w3 = M.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev), (8, 512))
s1, s3 = ((torch.rand(E, I, device=dev) * 2e-4 + 1e-4).bfloat16() for _ in range(2))
x = torch.randn(T, D, device=dev).bfloat16()
ids = torch.topk(torch.randn(T, E, device=dev), K, dim=-1).indices.reshape(-1).contiguous()
x16, xs = M.rows_to_fp16(x)


def t(fn):
    fn(); torch.cuda.synchronize()
    r = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); r.append(a.elapsed_time(b))
    return statistics.median(r)


# the landed kernel (through fused_moe's launch parameters) for reference, and correctness of the join kernel
order, _, _, slot_token, te, tr, tre = M.group_slots(ids, E, K, 128)
nm = te.numel()
h_ref = torch.empty(T * K, I, dtype=torch.float16, device=dev)
c = M.DEFAULT_CONFIG
landed = lambda: M._grouped_gate_up_kernel[(nm * triton.cdiv(I, c.grouped_fp16_gate_up_block_n),)](
    x16, w1, w3, s1, s3, h_ref, xs, slot_token, te, tr, tre, E, nm, D, I, x16.stride(0), w1.stride(0), w1.stride(1),
    s1.stride(0), h_ref.stride(0), HAS_SCALES=True, PRECISION="tf32", MAGIC=True, EVEN_K=True, BLOCK_M=128,
    BLOCK_N=c.grouped_fp16_gate_up_block_n, BLOCK_K=64, SWAP_AB=False, ROW_SCALE=True, BR=8, BC=512,
    num_warps=c.grouped_fp16_gate_up_warps, num_stages=3)
base = t(landed)
print(f"landed 128x{c.grouped_fp16_gate_up_block_n} w{c.grouped_fp16_gate_up_warps}: {base:.3f} ms", flush=True)
res = []
for bm, bn, bk, warps, stages in itertools.product([128, 64], [32, 64, 128], [64], [4, 8], [3, 4]):
    try:
        h = run(x16, xs, w1, w3, s1, s3, ids, K, bm, bn, bk, warps, stages, (8, 512))
        err = ((h.float() - h_ref.float()).norm() / h_ref.float().norm()).item()
        ms = t(lambda: run(x16, xs, w1, w3, s1, s3, ids, K, bm, bn, bk, warps, stages, (8, 512)))
    except Exception as exc:
        print(bm, bn, bk, warps, stages, "failed", type(exc).__name__, str(exc)[:100], flush=True)
        continue
    res.append((ms, bm, bn, bk, warps, stages, err))
    print(f"join bm={bm} bn={bn} bk={bk} w={warps} st={stages}: {ms:.3f} ms (err {err:.1e})", flush=True)
print("\nBEST join (landed %.3f ms)" % base)
for r in sorted(res)[:5]:
    print(f"{r[0]:.3f} ms bm={r[1]} bn={r[2]} bk={r[3]} w={r[4]} st={r[5]} err {r[6]:.1e}")
