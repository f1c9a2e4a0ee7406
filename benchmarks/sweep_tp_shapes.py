"""Time the decode kernels at the shapes one rank of a tensor-parallel Mixtral-8x7B runs (one GPU call).

    python benchmarks/sweep_tp_shapes.py [--world-sizes 1 2 4 8] [--parts moe linear] [--json OUT]

Under tensor parallelism over W ranks a rank's experts are [E, I / W, D] (w1 / w3) and [E, D, I / W] (w2),
its wqkv [(Q + 2 KV) / W, D] and its wo [D, Q / W]: the same bytes spread over W times fewer rows or
columns, so tiles chosen for one GPU can leave an eighth of the work to too few programs. For each W this
times batch-1 decode:

- the whole fused MoE (gate_up + down + sums) of int8 experts (w1 / w3 in quantize.INT8_W13_BLOCK blocks,
  as the engine stores them) and of bf16 experts, for several MoEConfig variants;
- the linear kernel at wqkv's and wo's shard (and the output head on one GPU), int8 and bf16 weights, for
  several tiles; bf16 also against cuBLAS.

Weights rotate over several layers' copies inside one CUDA graph, so that they come from device memory
as in a real step, not from L2. Prints microseconds per call and the bandwidth of the bytes read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from graph_timing import graph_replay_us  # noqa: E402

from gpt_fast_mixtral.kernels import linear, moe, pdl  # noqa: E402
from gpt_fast_mixtral.quantize import INT8_W13_BLOCK  # noqa: E402

E, TOP_K, D, INTER, Q, KV, VOCAB = 8, 2, 4096, 14336, 4096, 1024, 32000
MOE_VARIANTS = {
    "default": {},
    "gu_i4": dict(gemv_blocked_block_i=4, gemv_block_i=4),
    "gu_i8": dict(gemv_blocked_block_i=8),
    "gu_i32": dict(gemv_blocked_block_i=32, gemv_block_i=16),
    "w8": dict(gemv_warps=8),
    "dn_s2": dict(gemv_split=2),
    "dn_s1": dict(gemv_split=1),
    "dn_o4_s2": dict(gemv_down_block_o=4, gemv_split=2),
    "dn_o4_i1024_s1": dict(gemv_down_block_o=4, gemv_down_block_i=1024, gemv_split=1),
    "dn_o16_i256": dict(gemv_down_block_o=16, gemv_down_block_i=256),
    "dn_o8_i1024_s2": dict(gemv_down_block_o=8, gemv_down_block_i=1024, gemv_split=2),
    "dn_o4_i256_s2": dict(gemv_down_block_o=4, gemv_down_block_i=256, gemv_split=2),
    "dn_o16": dict(gemv_down_block_o=16),
    "dn_o16_s2": dict(gemv_down_block_o=16, gemv_split=2),
    "dn_o16_s1": dict(gemv_down_block_o=16, gemv_split=1),
    "dn_o32_s2": dict(gemv_down_block_o=32, gemv_split=2),
    "dn_int8_o8_s4": dict(gemv_int8_down_block_o=8, gemv_int8_split=4),  # int8's down tile before session 13
    "gu_i4_dn_s1": dict(gemv_blocked_block_i=4, gemv_block_i=4, gemv_split=1),
    "gu_i8_dn_o4_s2": dict(gemv_blocked_block_i=8, gemv_down_block_o=4, gemv_split=2),
    # the matrix-vector loops pipelined (MoEConfig.gemv_stages, and gemv_stages_16bit for bf16 weights)
    "st1": dict(gemv_stages=1, gemv_stages_16bit=1),
    "st2": dict(gemv_stages=2, gemv_stages_16bit=2),
    "st3": dict(gemv_stages=3, gemv_stages_16bit=3),
    "st4": dict(gemv_stages=4, gemv_stages_16bit=4),
    "gu_i4_st3": dict(gemv_blocked_block_i=4, gemv_block_i=4, gemv_stages=3, gemv_stages_16bit=3),
    "gu_i8_st3": dict(gemv_blocked_block_i=8, gemv_stages=3, gemv_stages_16bit=3),
    "gu_i32_st3": dict(gemv_blocked_block_i=32, gemv_block_i=16, gemv_stages=3, gemv_stages_16bit=3),
    "st3_dn_s1": dict(gemv_stages=3, gemv_stages_16bit=3, gemv_split=1),
    "st3_dn_s2": dict(gemv_stages=3, gemv_stages_16bit=3, gemv_split=2),
    "st3_dn_o4_i256_s2": dict(gemv_stages=3, gemv_stages_16bit=3, gemv_down_block_o=4, gemv_down_block_i=256,
                              gemv_split=2),
    "gu_i8_st3_dn_o4_i256_s1": dict(gemv_blocked_block_i=8, gemv_stages=3, gemv_stages_16bit=3, gemv_down_block_o=4,
                                     gemv_down_block_i=256, gemv_split=1),
}
# (rows, columns, warps, stages) of the one-token tile; None: LinearConfig's default (linear.gemv_tile)
LINEAR_TILES = [None, (2, 2048, 4, 1), (4, 1024, 4, 1), (8, 512, 4, 1), (4, 512, 4, 1), (2, 1024, 4, 1),
                (1, 2048, 4, 1), (1, 4096, 4, 1), (2, 4096, 4, 1), (2, 4096, 8, 1), (4, 4096, 8, 1),
                (2, 2048, 4, 2), (2, 1024, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (8, 256, 4, 4), (4, 1024, 4, 2),
                (16, 256, 4, 4)]
# whole LinearConfig plans (tile and stages chosen per shape by linear.gemv_plan), as changes to the default
LINEAR_PLANS = {
    "plan_k4096_pipe6144": dict(gemv_block_k=4096, gemv_pipeline_min_programs=768),
    "plan_pipe6144": dict(gemv_pipeline_min_programs=768),
    "plan_unpipelined": dict(gemv_pipeline_min_programs=1 << 30),
    "plan_k4096_unpipelined": dict(gemv_block_k=4096, gemv_pipeline_min_programs=1 << 30),
}
# the same for bf16 weights (linear.linear; None: linear.HALF_CONFIG)
HALF_LINEAR_TILES = [None, (1, 1024, 4, 1), (2, 1024, 4, 1), (1, 2048, 4, 1), (2, 2048, 4, 1), (4, 512, 4, 1),
                     (4, 256, 4, 3), (8, 256, 4, 3), (4, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3),
                     (8, 256, 4, 4), (2, 1024, 4, 2), (4, 1024, 4, 2), (8, 256, 8, 3)]


VARIANT_PATTERN = re.compile("")


def selected(variant: str) -> bool:
    """Whether --variants picks this variant (the defaults always run: every row is compared with them)."""
    return variant == "default" or bool(VARIANT_PATTERN.search(variant))


def int8(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda", generator=generator)


def both_down_tiles(change: dict) -> dict:
    """A variant's down tile (gemv_down_block_o, gemv_split) for int8 weights too, which take their own
    (MoEConfig.gemv_int8_down_block_o / gemv_int8_split) otherwise."""
    int8 = {"gemv_down_block_o": "gemv_int8_down_block_o", "gemv_split": "gemv_int8_split"}
    return {**change, **{int8[name]: value for name, value in change.items() if name in int8}}


def sweep_moe(world_size: int, precision: str, layers: int, rows: list[dict]) -> None:
    inter = INTER // world_size
    generator = torch.Generator(device="cuda").manual_seed(world_size)
    if precision == "int8":
        block = INT8_W13_BLOCK
        w1s = [moe.block_rows(int8(generator, E, inter, D), block) for _ in range(layers)]
        w3s = [moe.block_rows(int8(generator, E, inter, D), block) for _ in range(layers)]
        w2s = [int8(generator, E, D, inter) for _ in range(layers)]
        scales = tuple(torch.rand(E, n, device="cuda", generator=generator).bfloat16() * 1e-3
                       for n in (inter, D, inter))
    else:
        block, scales = None, None
        w1s, w3s, w2s = ([torch.randn(*shape, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
                          for _ in range(layers)] for shape in ((E, inter, D), (E, inter, D), (E, D, inter)))
    ids = [torch.randperm(E, device="cuda", generator=generator)[:TOP_K].view(1, TOP_K) for _ in range(layers)]
    routing = torch.tensor([[0.6, 0.4]], device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, D, device="cuda", generator=generator, dtype=torch.bfloat16)
    read = TOP_K * 3 * inter * D * w1s[0].element_size()
    base = moe.DEFAULT_CONFIG
    reference = moe.fused_moe(x, w1s[0], w2s[0], w3s[0], routing, ids[0], scales, base, block).float()
    for name, change in MOE_VARIANTS.items():
        if not selected(name):
            continue
        config = dataclasses.replace(base, **both_down_tiles(change))
        try:
            got = moe.fused_moe(x, w1s[0], w2s[0], w3s[0], routing, ids[0], scales, config, block).float()
            error = ((got - reference).norm() / reference.norm()).item()
            us = graph_replay_us(lambda c=config: [moe.fused_moe(x, w1s[n], w2s[n], w3s[n], routing, ids[n], scales, c,
                                                                 block) for n in range(layers)]) / layers
        except Exception as failure:  # a tile the compiler or the kernel's constraints reject
            print(f"moe W={world_size} {precision} {name}: failed {type(failure).__name__}: {failure}"[:200])
            continue
        rows.append(dict(part="moe", world_size=world_size, precision=precision, variant=name, us=us,
                         tb_s=read / us / 1e6, rel_error=error))
        print(f"moe    W={world_size} {precision:4} {name:16} {us:7.2f} us {read / us / 1e6:5.2f} TB/s  "
              f"err {error:.1e}", flush=True)


def sweep_linear(world_size: int, copies: int, precision: str, rows: list[dict]) -> None:
    """int8 weights: the kernel's tiles. bf16: the kernel's tiles (with PDL, where the GPU has it, as in the
    decode step; the default tile also without), against cuBLAS (F.linear, the path it replaces)."""
    generator = torch.Generator(device="cuda").manual_seed(100 + world_size)
    x = torch.randn(1, D, device="cuda", generator=generator, dtype=torch.bfloat16)
    tiles = LINEAR_TILES if precision == "int8" else HALF_LINEAR_TILES
    for name, (n, k) in {"wqkv": ((Q + 2 * KV) // world_size, D), "wo": (D, Q // world_size),
                         "head": (VOCAB, D)}.items():
        if name == "head" and world_size > 1:
            continue  # the output head is not sharded
        layer_copies = max(2, min(copies, -(-400_000_000 // (n * k))))  # several times the 50 MB L2
        xk = x[:, :k].contiguous()
        if precision == "int8":
            weights = [int8(generator, n, k) for _ in range(layer_copies)]
            scales = torch.rand(n, device="cuda", generator=generator).bfloat16() * 1e-3
            reference = linear.reference_int8_linear(xk, weights[0], scales)
        else:
            weights = [torch.randn(n, k, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
                       for _ in range(layer_copies)]
            scales = None
            reference = xk.float() @ weights[0].float().T
        calls = {}
        for tile in tiles:
            if tile is None:
                config = linear.DEFAULT_CONFIG if precision == "int8" else linear.HALF_CONFIG
                variant = "default"
            else:
                block_n, block_k, warps, stages = tile
                config = linear.LinearConfig(gemv_block_n=block_n, gemv_block_k=block_k, gemv_warps=warps,
                                             gemv_stages=stages)
                variant = f"n{block_n}_k{block_k}_w{warps}_st{stages}"
            if precision == "int8":
                calls[variant] = lambda w, c=config, x=xk, s=scales: linear.int8_linear(x, w, s, c)
            else:
                calls[variant] = lambda w, c=config, x=xk: linear.linear(x, w, c)
        if precision == "int8":
            for variant, change in LINEAR_PLANS.items():
                config = dataclasses.replace(linear.DEFAULT_CONFIG, **change)
                calls[variant] = lambda w, c=config, x=xk, s=scales: linear.int8_linear(x, w, s, c)
        if precision == "bf16":
            calls["cublas"] = lambda w, x=xk: torch.nn.functional.linear(x, w)
            calls["default_nopdl"] = calls["default"]
        for variant, call in calls.items():
            if not selected(variant):
                continue
            enabled = pdl.ENABLED
            pdl.ENABLED = enabled and not variant.endswith("_nopdl")
            try:
                got = call(weights[0]).float()
                error = ((got - reference).norm() / reference.norm()).item()
                us = graph_replay_us(lambda call=call, ws=weights: [call(w) for w in ws]) / layer_copies
            except Exception as failure:  # a tile the compiler rejects
                print(f"{name} W={world_size} {precision} {variant}: failed {type(failure).__name__}: {failure}"[:200])
                continue
            finally:
                pdl.ENABLED = enabled
            read = n * k * weights[0].element_size()
            rows.append(dict(part=name, world_size=world_size, precision=precision, variant=variant, us=us,
                             tb_s=read / us / 1e6, rel_error=error))
            print(f"{name:6} W={world_size} {precision} {variant:16} {us:7.2f} us {read / us / 1e6:5.2f} TB/s  "
                  f"err {error:.1e}", flush=True)
        weights.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--parts", nargs="*", default=["moe", "linear"], choices=["moe", "linear"])
    parser.add_argument("--precisions", nargs="*", default=["int8", "bf16"], choices=["int8", "bf16"])
    parser.add_argument("--layers", type=int, default=8, help="copies of the experts rotated in one graph")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variants", default="", help="regular expression: run only the variants it finds")
    options = parser.parse_args()
    global VARIANT_PATTERN
    VARIANT_PATTERN = re.compile(options.variants)
    rows: list[dict] = []
    for world_size in options.world_sizes:
        if "moe" in options.parts:
            for precision in options.precisions:
                sweep_moe(world_size, precision, options.layers, rows)
                torch.cuda.empty_cache()
        if "linear" in options.parts:
            for precision in options.precisions:
                sweep_linear(world_size, 32, precision, rows)
                torch.cuda.empty_cache()
    best = {}
    for row in rows:
        key = (row["part"], row["world_size"], row["precision"])
        if key not in best or row["us"] < best[key]["us"]:
            best[key] = row
    print(f"\n{'part':5} {'W':>2} {'prec':5} {'default us':>10} {'best':>16} {'us':>7} {'TB/s':>5}")
    for (part, world_size, precision), row in best.items():
        default = next(r["us"] for r in rows if (r["part"], r["world_size"], r["precision"]) == (part, world_size,
                                                                                              precision)
                       and r["variant"] == "default")
        print(f"{part:5} {world_size:>2} {precision:5} {default:10.2f} {row['variant']:>16} {row['us']:7.2f} "
              f"{row['tb_s']:5.2f}")
    if options.json:
        options.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                            "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
