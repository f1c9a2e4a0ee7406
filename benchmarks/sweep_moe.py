"""Time the fused MoE kernels at Mixtral-8x7B's shape for several tile configs (one GPU call).

    python benchmarks/sweep_moe.py [--tokens 1 8]       (decode)
    python benchmarks/sweep_moe.py --tokens 512 2048    (prefill tiles)
    python benchmarks/sweep_moe.py --tokens 1 --precisions int8 --configs gemv    (a subset)
Prints, per config, microseconds per layer and the bandwidth of the expert bytes actually read.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from gpt_fast_mixtral.kernels.moe import MoEConfig, fused_moe  # noqa: E402

CONFIGS = {
    "tiled": MoEConfig(gemv_max_slots=0),
    "tiled_nomagic": MoEConfig(gemv_max_slots=0, int8_magic=False),
    "tiled_d128s4": MoEConfig(gemv_max_slots=0, gate_up_block_d=128, gate_up_stages=4, down_block_o=64, split=8),
    "gemv": MoEConfig(gemv_max_slots=1 << 30),
    "gemv_nomagic": MoEConfig(gemv_max_slots=1 << 30, int8_magic=False),
    "gemv_i32": MoEConfig(gemv_max_slots=1 << 30, gemv_block_i=32, gemv_block_d=256),
    "gemv_i8": MoEConfig(gemv_max_slots=1 << 30, gemv_block_i=8, gemv_block_d=1024),
    "gemv_d1024": MoEConfig(gemv_max_slots=1 << 30, gemv_block_d=1024, gemv_down_block_i=1024),
    "gemv_w8": MoEConfig(gemv_max_slots=1 << 30, gemv_warps=8),
    "gemv_w8_d1024": MoEConfig(gemv_max_slots=1 << 30, gemv_warps=8, gemv_block_d=1024, gemv_down_block_i=1024),
    "gemv_o16": MoEConfig(gemv_max_slots=1 << 30, gemv_down_block_o=16),
    "gemv_o4": MoEConfig(gemv_max_slots=1 << 30, gemv_down_block_o=4, gemv_down_block_i=1024),
    "gemv_s2": MoEConfig(gemv_max_slots=1 << 30, gemv_split=2),
    "gemv_s8": MoEConfig(gemv_max_slots=1 << 30, gemv_split=8),
    # persistent grids (session 3, unmeasured): programs = a multiple of the 132 SMs of an H100/H200
    "gemv_p264": MoEConfig(gemv_max_slots=1 << 30, gemv_programs=264),
    "gemv_p528": MoEConfig(gemv_max_slots=1 << 30, gemv_programs=528),
    "gemv_p1056": MoEConfig(gemv_max_slots=1 << 30, gemv_programs=1056),
    "gemv_p528_s1": MoEConfig(gemv_max_slots=1 << 30, gemv_programs=528, gemv_split=1),
    "gemv_s1": MoEConfig(gemv_max_slots=1 << 30, gemv_split=1),
}
# Prefill (more than 16 slots per expert uses prefill_block_t): GEMM-sized tiles, no split of the down
# reduction (its float32 partials cost as much as the weights at thousands of tokens).
TILES = MoEConfig(gemv_max_slots=0, grouped_min_slots=1 << 62)  # the tile kernels, never the grouped ones
GROUPED = MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_down_block_n=128)  # session 3's tiles
FP16 = replace(GROUPED, grouped_int8_fp16=True, grouped_fp16_gate_up_block_n=128, grouped_fp16_gate_up_warps=8)
PREFILL_CONFIGS = {
    "tiled": TILES,
    "pf_t64_i64_s1": replace(TILES, prefill_block_t=64, gate_up_block_i=64, gate_up_block_d=64, down_block_o=64,
                             down_block_i=64, split=1),
    "pf_t128_i64_w8": replace(TILES, prefill_block_t=128, gate_up_block_i=64, gate_up_block_d=64, down_block_o=64,
                              down_block_i=64, gate_up_warps=8, down_warps=8, split=1),
    "pf_t128_i128_w8": replace(TILES, prefill_block_t=128, gate_up_block_i=128, gate_up_block_d=64,
                               down_block_o=128, down_block_i=64, gate_up_warps=8, down_warps=8, split=1),
    "pf_t64_i128_w8_s4": replace(TILES, prefill_block_t=64, gate_up_block_i=128, gate_up_block_d=64,
                                 down_block_o=128, down_block_i=64, gate_up_warps=8, down_warps=8,
                                 gate_up_stages=4, down_stages=4, split=1),
    # The grouped GEMM kernels (token tiles in the grid, K-major weight tiles); kernels.moe's default since
    # session 4 is grouped_128x256x64_down.
    "grouped_128x128x64": GROUPED,
    "grouped_128x128x64_s4": replace(GROUPED, grouped_stages=4),
    "grouped_128x64x64": replace(GROUPED, grouped_block_n=64),
    "grouped_64x128x64": replace(GROUPED, grouped_block_m=64, grouped_warps=4),
    "grouped_128x256x64_down": replace(GROUPED, grouped_down_block_n=256),
    "grouped_128x128x128": replace(GROUPED, grouped_block_k=128, grouped_stages=2),
    # weights as the dot's first operand (from registers), tokens second
    "grouped_swap_64x128x64": replace(GROUPED, grouped_swap_ab=True, grouped_block_m=64),
    "grouped_swap_128x128x64": replace(GROUPED, grouped_swap_ab=True),
    "grouped_swap_64x256x64_w8": replace(GROUPED, grouped_swap_ab=True, grouped_block_m=64, grouped_block_n=256,
                                         grouped_down_block_n=256),
    "grouped_swap_128x128x64_s4": replace(GROUPED, grouped_swap_ab=True, grouped_stages=4),
    # int8 weights x row-scaled float16 activations (session 5). Their gate_up tile has its own fields
    # (grouped_fp16_gate_up_block_n / _warps): FP16 is session 5's 128 x 128, 8 warps; the default since
    # session 34 is grouped_fp16_128x64x64_w4's gate_up (its down keeps 8 warps).
    "grouped_fp16_128x256x64_down": replace(FP16, grouped_down_block_n=256),
    "grouped_fp16_128x128x64": FP16,
    "grouped_fp16_128x256x64_down_s4": replace(FP16, grouped_down_block_n=256, grouped_stages=4),
    "grouped_fp16_swap_128x128x64": replace(FP16, grouped_swap_ab=True),
    "grouped_fp16_swap_64x256x64": replace(FP16, grouped_swap_ab=True, grouped_block_m=64,
                                           grouped_fp16_gate_up_block_n=256, grouped_down_block_n=256),
    "grouped_fp16_128x64x64": replace(FP16, grouped_fp16_gate_up_block_n=64),
    "grouped_fp16_128x64x64_w4": replace(FP16, grouped_fp16_gate_up_block_n=64, grouped_fp16_gate_up_warps=4),
    "grouped_fp16_128x128x64_s4": replace(FP16, grouped_stages=4),
    "grouped_fp16_64x128x64_w4": replace(FP16, grouped_block_m=64, grouped_warps=4, grouped_fp16_gate_up_warps=4),
    "grouped_fp16_128x128x32_s5": replace(FP16, grouped_block_k=32, grouped_stages=5),
    "grouped_fp16_128x128x64_down64": replace(FP16, grouped_fp16_down_block_n=64),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 8])
    parser.add_argument("--configs", nargs="*", default=None,
                        help="only the configs whose names contain one of these strings")
    parser.add_argument("--precisions", nargs="*", default=["int8", "bf16"], choices=["int8", "bf16"])
    options = parser.parse_args()
    experts, top_k, dim, inter = 8, 2, 4096, 14336
    torch.manual_seed(0)
    rows = []
    for precision in options.precisions:
        if precision == "int8":
            weights = [torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
                       for shape in ((experts, inter, dim), (experts, dim, inter), (experts, inter, dim))]
            scales = (torch.rand(experts, inter, device="cuda", dtype=torch.bfloat16) * 1e-3,
                      torch.rand(experts, dim, device="cuda", dtype=torch.bfloat16) * 1e-3,
                      torch.rand(experts, inter, device="cuda", dtype=torch.bfloat16) * 1e-3)
        else:
            weights = [torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
                       for shape in ((experts, inter, dim), (experts, dim, inter), (experts, inter, dim))]
            scales = None
        for tokens in options.tokens:
            x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
            routing = torch.rand(tokens, experts, device="cuda").softmax(-1)
            weights_k, indices = routing.topk(top_k, dim=-1)
            weights_k = weights_k.bfloat16()
            touched = indices.unique().numel()
            moved = touched * 3 * dim * inter * weights[0].element_size()
            for name, config in (PREFILL_CONFIGS if tokens * top_k > 16 * experts else CONFIGS).items():
                if options.configs and not any(part in name for part in options.configs):
                    continue
                call = lambda c=config, x=x, w=weights, r=weights_k, i=indices, s=scales: fused_moe(  # noqa: E731
                    x, *w, r, i, s, c)
                try:
                    call()
                    ms = triton.testing.do_bench_cudagraph(call, rep=200)
                except Exception as error:  # a tile config the compiler rejects
                    print(f"{precision} N={tokens} {name}: failed {type(error).__name__}: {error}"[:200])
                    continue
                rows.append((precision, tokens, name, ms * 1e3, moved / (ms * 1e-3) / 1e12))
            del x
        del weights
    print(f"{'precision':9} {'N':>3} {'config':12} {'us/layer':>9} {'TB/s':>6}")
    for precision, tokens, name, us, tbs in rows:
        print(f"{precision:9} {tokens:>3} {name:12} {us:9.1f} {tbs:6.2f}")
    print("fields:", [f.name for f in dataclasses.fields(MoEConfig)])


if __name__ == "__main__":
    main()
