"""Session 12: the two decode expert kernels timed separately, per-kernel stages / tiles (one H200)."""
import sys, itertools
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "benchmarks")]
import torch, triton
from graph_timing import graph_replay_us
from gpt_fast_mixtral.kernels import moe
from gpt_fast_mixtral.quantize import INT8_W13_BLOCK

E, TOP_K, D, INTER = 8, 2, 4096, 14336
LAYERS = 8

def gate_up(x, w1, w3, s, h, experts, block, rows, block_d, stages, warps):
    slots, inter = h.shape
    dim = x.shape[1]
    moe._gate_up_gemv_kernel[(slots, triton.cdiv(inter, rows))](
        x, w1, w3, s[0], s[2], h, experts, TOP_K, 0, dim, inter, x.stride(0), w1.stride(0), w1.stride(1),
        s[0].stride(0), h.stride(0), HAS_SCALES=True, MAGIC=True, BLOCK_I=rows, BLOCK_D=block_d,
        PERSISTENT=False, BR=block[0], BC=block[1], STAGES=stages, num_warps=warps)

def down(h, w2, s, y, experts, routing, block_o, block_i, split, stages, warps):
    slots, inter = h.shape
    dim = w2.shape[1]
    moe._down_gemv_kernel[(slots, triton.cdiv(dim, block_o), split)](
        h, w2, s[1], y, experts, routing, 0, dim, inter, h.stride(0), w2.stride(0), w2.stride(1), s[1].stride(0),
        y.stride(1), y.stride(0), HAS_SCALES=True, MAGIC=True, SPLIT=split,
        BLOCK_O=block_o, BLOCK_I=block_i, PERSISTENT=False, STAGES=stages, num_warps=warps)

def main():
    for W in [int(a) for a in sys.argv[1:]] or [1, 2, 4]:
        inter = INTER // W
        g = torch.Generator(device="cuda").manual_seed(W)
        i8 = lambda *s: torch.randint(-127, 128, s, dtype=torch.int8, device="cuda", generator=g)
        block = INT8_W13_BLOCK
        w1s = [moe.block_rows(i8(E, inter, D), block) for _ in range(LAYERS)]
        w3s = [moe.block_rows(i8(E, inter, D), block) for _ in range(LAYERS)]
        w2s = [i8(E, D, inter) for _ in range(LAYERS)]
        s = tuple(torch.rand(E, n, device="cuda", generator=g).bfloat16() * 1e-3 for n in (inter, D, inter))
        ids = [torch.randperm(E, device="cuda", generator=g)[:TOP_K].contiguous() for _ in range(LAYERS)]
        routing = torch.tensor([0.6, 0.4], device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, D, device="cuda", generator=g, dtype=torch.bfloat16)
        h = torch.randn(TOP_K, inter, device="cuda", generator=g, dtype=torch.bfloat16)
        gu_bytes = TOP_K * 2 * inter * D
        dn_bytes = TOP_K * inter * D
        default_rows = moe.gemv_rows(inter, moe.DEFAULT_CONFIG, block)
        ref_h = torch.empty_like(h)
        gate_up(x, w1s[0], w3s[0], s, ref_h, ids[0], block, default_rows, 512, 1, 4)
        for rows, block_d, stages, warps in [(default_rows, 512, 1, 4), (default_rows, 512, 2, 4), (default_rows, 512, 3, 4),
                                             (default_rows // 2, 512, 1, 4), (default_rows // 2, 512, 2, 4),
                                             (default_rows // 2, 512, 3, 4), (default_rows, 256, 3, 4),
                                             (default_rows, 512, 2, 8), (default_rows * 2, 512, 2, 8)]:
            try:
                hh = torch.empty_like(h)
                gate_up(x, w1s[0], w3s[0], s, hh, ids[0], block, rows, block_d, stages, warps)
                err = ((hh.float() - ref_h.float()).norm() / ref_h.float().norm()).item()
                us = graph_replay_us(lambda: [gate_up(x, w1s[n], w3s[n], s, hh, ids[n], block, rows, block_d, stages, warps)
                                              for n in range(LAYERS)]) / LAYERS
                print(f"W={W} gate_up rows {rows:2} d {block_d:4} st {stages} w {warps}: {us:6.2f} us {gu_bytes / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)
            except Exception as e:
                print(f"W={W} gate_up rows {rows} d {block_d} st {stages} w {warps}: failed {type(e).__name__} {str(e)[:200]}", flush=True)
        ref_y = torch.empty(4, TOP_K, D, device="cuda")
        down(h, w2s[0], s, ref_y, ids[0], routing, 8, 512, 4, 1, 4)
        ref = ref_y.sum(0)
        for block_o, block_i, split, stages, warps in itertools.chain(
                [(8, 512, 4, st, 4) for st in (1, 2, 3, 4)],
                [(8, 256, 4, st, 4) for st in (1, 3, 4)],
                [(4, 512, 4, st, 4) for st in (1, 3)],
                [(16, 512, 4, st, 8) for st in (1, 3)],
                [(8, 512, 2, st, 4) for st in (1, 3)],
                [(8, 1024, 4, st, 4) for st in (2, 3)],
                [(16, 256, 4, st, 4) for st in (1, 3)]):
            try:
                y = torch.empty(split, TOP_K, D, device="cuda")
                down(h, w2s[0], s, y, ids[0], routing, block_o, block_i, split, stages, warps)
                err = ((y.sum(0) - ref).norm() / ref.norm()).item()
                us = graph_replay_us(lambda: [down(h, w2s[n], s, y, ids[n], routing, block_o, block_i, split, stages, warps)
                                              for n in range(LAYERS)]) / LAYERS
                print(f"W={W} down o {block_o:2} i {block_i:4} split {split} st {stages} w {warps}: {us:6.2f} us {dn_bytes / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)
            except Exception as e:
                print(f"W={W} down o {block_o} i {block_i} split {split} st {stages}: failed {type(e).__name__} {str(e)[:200]}", flush=True)
        del w1s, w2s, w3s
        torch.cuda.empty_cache()

main()
