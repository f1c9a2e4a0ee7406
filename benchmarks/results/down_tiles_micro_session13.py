"""Session 13: the int8 down matrix-vector kernel (row-major w2) in several tiles, against w2 in [16, 512] blocks (one H200)."""
import sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch, triton, triton.language as tl
from graph_timing import graph_replay_us
from gpt_fast_mixtral.kernels import moe
from gpt_fast_mixtral.kernels.moe import dequant

@triton.jit
def down_blocked(h_ptr, w2_ptr, s2_ptr, y_ptr, experts_ptr, routing_ptr, dim, inter, stride_h, stride_we,
                 stride_se, stride_y, stride_split, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                 BR: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr):
    slot = tl.program_id(0)
    o_block = tl.program_id(1)
    split = tl.program_id(2)
    offs_o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    split_len = tl.cdiv(tl.cdiv(inter, SPLIT), BLOCK_I) * BLOCK_I
    split_end = tl.minimum((split + 1) * split_len, inter)
    r = offs_o.to(tl.int64)
    w_base = expert * stride_we + ((r // BR) * (BR * inter) + (r % BR) * BC)[:, None]
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for i0 in tl.range(split * split_len, split_end, BLOCK_I, num_stages=STAGES):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        h = tl.load(h_ptr + slot.to(tl.int64) * stride_h + offs_i).to(tl.float32)
        col = tl.multiple_of(i0 + (i0 // BC) * (BR * BC - BC), BLOCK_I)
        w2 = dequant(tl.load(w2_ptr + w_base + (col + tl.arange(0, BLOCK_I))[None, :]), tl.float32, True)
        acc += tl.sum(w2 * h[None, :], axis=1)
    acc *= tl.load(s2_ptr + expert * stride_se + offs_o).to(tl.float32)
    acc *= tl.load(routing_ptr + slot).to(tl.float32)
    tl.store(y_ptr + split.to(tl.int64) * stride_split + slot.to(tl.int64) * stride_y + offs_o, acc)


def run_blocked(h, w2b, s2, y, experts, routing, block_o, block_i, split, stages, br, bc, warps=4):
    slots, inter = h.shape
    dim = w2b.shape[1]
    down_blocked[(slots, triton.cdiv(dim, block_o), split)](
        h, w2b, s2, y, experts, routing, dim, inter, h.stride(0), w2b.stride(0), s2.stride(0), y.stride(1), y.stride(0),
        SPLIT=split, BLOCK_O=block_o, BLOCK_I=block_i, BR=br, BC=bc, STAGES=stages, num_warps=warps)


def run_plain(h, w2, s2, y, experts, routing, block_o, block_i, split, stages, warps=4):
    slots, inter = h.shape
    dim = w2.shape[1]
    moe._down_gemv_kernel[(slots, triton.cdiv(dim, block_o), split)](
        h, w2, s2, y, experts, routing, 0, dim, inter, h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0),
        y.stride(1), y.stride(0), HAS_SCALES=True, MAGIC=True, SPLIT=split, BLOCK_O=block_o, BLOCK_I=block_i,
        PERSISTENT=False, STAGES=stages, num_warps=warps)


def main():
    E, TOP_K, D, INTER, LAYERS = 8, 2, 4096, 14336, 8
    for W in [int(a) for a in sys.argv[1:]] or [1, 2, 4]:
        inter = INTER // W
        g = torch.Generator(device="cuda").manual_seed(W)
        w2s = [torch.randint(-127, 128, (E, D, inter), dtype=torch.int8, device="cuda", generator=g) for _ in range(LAYERS)]
        s2 = torch.rand(E, D, device="cuda", generator=g).bfloat16() * 1e-3
        ids = [torch.randperm(E, device="cuda", generator=g)[:TOP_K].contiguous() for _ in range(LAYERS)]
        routing = torch.tensor([0.6, 0.4], device="cuda", dtype=torch.bfloat16)
        h = torch.randn(TOP_K, inter, device="cuda", generator=g, dtype=torch.bfloat16)
        nbytes = TOP_K * inter * D
        y0 = torch.empty(4, TOP_K, D, device="cuda")
        run_plain(h, w2s[0], s2, y0, ids[0], routing, 8, 512, 4, 1)
        ref = y0.sum(0)
        for bo, bi, sp, stages in ((8, 512, 4, 3), (8, 512, 4, 2), (8, 512, 4, 1), (16, 512, 2, 3), (16, 512, 2, 2), (16, 512, 4, 3), (16, 512, 4, 1), (16, 512, 2, 1), (32, 512, 2, 3), (16, 1024, 2, 3), (16, 256, 2, 3)):
            y = torch.empty(sp, TOP_K, D, device="cuda")
            run_plain(h, w2s[0], s2, y, ids[0], routing, bo, bi, sp, stages)
            err = ((y.sum(0) - ref).norm() / ref.norm()).item()
            us = graph_replay_us(lambda: [run_plain(h, w2s[n], s2, y, ids[n], routing, bo, bi, sp, stages) for n in range(LAYERS)]) / LAYERS
            print(f"W={W} plain   o {bo} i {bi} split {sp} st {stages}: {us:6.2f} us {nbytes / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)
        for br, bc in ((16, 512),):
            if inter % bc:
                continue
            w2b = [moe.block_rows(w, (br, bc)) for w in w2s]
            for block_o, block_i, split, stages in ((br, bc, 4, 1), (br, bc, 2, 3), (br, bc, 2, 2)):
                try:
                    y = torch.empty(split, TOP_K, D, device="cuda")
                    run_blocked(h, w2b[0], s2, y, ids[0], routing, block_o, block_i, split, stages, br, bc)
                    err = ((y.sum(0) - ref).norm() / ref.norm()).item()
                    us = graph_replay_us(lambda: [run_blocked(h, w2b[n], s2, y, ids[n], routing, block_o, block_i, split, stages, br, bc)
                                                  for n in range(LAYERS)]) / LAYERS
                    print(f"W={W} blocked {br}x{bc} o {block_o} i {block_i} split {split} st {stages}: {us:6.2f} us {nbytes / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)
                except Exception as e:
                    print(f"W={W} blocked {br}x{bc} split {split} st {stages}: failed {type(e).__name__} {str(e)[:200]}", flush=True)
            del w2b
        del w2s
        torch.cuda.empty_cache()

main()
