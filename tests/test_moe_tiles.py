"""The grouped MoE kernels' tiling (kernels/moe.py expert_tiles) covers every routed row exactly once, the
matrix-vector expert kernels' rows and pipeline stages follow the shard's shape, and the int8 linear
kernel's one-token tiles (kernels/linear.py gemv_tile) fit the weight's width."""

from __future__ import annotations

import math

import pytest
import torch

from gpt_fast_mixtral.kernels.linear import LinearConfig, gemv_plan, gemv_tile
from gpt_fast_mixtral.kernels.moe import MoEConfig, expert_tiles, gemv_down_tile, gemv_rows, gemv_stages_for


@pytest.mark.parametrize(("counts", "block_m"), [
    ([3, 0, 5, 1], 2),
    ([0, 0, 0], 4),
    ([16, 16], 16),
    ([17, 0, 0, 31, 2], 8),
    ([1] * 9, 128),
])
def test_tiles_cover_each_experts_rows_once(counts: list[int], block_m: int) -> None:
    counts_t = torch.tensor(counts, dtype=torch.int32)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    parked = 3  # slots with no expert sit after the last expert's rows; no tile may cover them
    slots = sum(counts) + parked
    tile_expert, first_row, rows_end = expert_tiles(counts_t, offsets, slots, block_m)
    assert tile_expert.numel() == -(-slots // block_m) + len(counts)  # the static bound
    owner = {}
    for expert, first, end in zip(tile_expert.tolist(), first_row.tolist(), rows_end.tolist(), strict=True):
        if expert == len(counts):
            continue  # an empty tile past the last expert's
        assert 0 <= expert < len(counts)
        rows = range(first, min(first + block_m, end))
        assert len(rows) > 0, "a tile of an expert must hold at least one of its rows"
        for row in rows:
            assert row not in owner, f"row {row} in two tiles"
            owner[row] = expert
    expected = {row: e for e, (o, c) in enumerate(zip(offsets.tolist(), counts, strict=True))
                for row in range(o, o + c)}
    assert owner == expected


@pytest.mark.parametrize(("k", "tile"), [
    (4096, (2, 2048)),  # one GPU: the configured tile
    (2048, (2, 2048)),
    (1024, (4, 1024)),  # wo over 4 ranks
    (512, (8, 512)),  # wo over 8 ranks: 8 x 512, not 2 x 2048 with three quarters masked off
    (600, (4, 1024)),  # not a power of two: the next one covers it
    (64, (64, 64)),
])
def test_one_token_linear_tiles_are_no_wider_than_the_weight_and_keep_their_size(k: int, tile: tuple[int, int]
                                                                                  ) -> None:
    assert gemv_tile(k, LinearConfig(gemv_block_n=2, gemv_block_k=2048)) == tile


@pytest.mark.parametrize(("inter", "w13_block", "rows"), [
    (14336, (8, 512), 16),  # Mixtral on one GPU: int8 (w1 / w3 in blocks) 16 rows, bf16 (row-major) 8
    (14336, None, 8),
    (7168, (8, 512), 16),  # over 2 ranks: still 448 row blocks per slot
    (3584, (8, 512), 8),  # over 4 ranks
    (1792, (8, 512), 4),  # over 8 ranks
    (1792, None, 4),
    (96, (8, 32), 4),  # never below gemv_min_block_i
    (6, (2, 32), 2),  # blocked rows must divide the experts' rows: the block's own height does
])
def test_gate_up_programs_take_fewer_rows_when_a_shard_has_few(inter: int, w13_block: tuple[int, int] | None,
                                                               rows: int) -> None:
    assert gemv_rows(inter, MoEConfig(), w13_block) == rows



@pytest.mark.parametrize(("inter", "rows"), [(14336, 8), (7168, 8), (3584, 8), (1792, 4), (100, 4)])
def test_half2_gate_up_programs_take_eight_rows_or_fewer(inter: int, rows: int) -> None:
    """int8 gate_up with float16 products (MoEConfig.gemv_int8_half2): 8-row programs, halved as the others."""
    assert gemv_rows(inter, MoEConfig(), (8, 512), half2=True) == rows

def mixtral_stages(world_size: int, weight_bytes: int, config: MoEConfig) -> tuple[int, int]:
    """gemv_stages_for at one rank's shape of Mixtral-8x7B's experts (batch 1: two slots)."""
    inter = 14336 // world_size
    rows = gemv_rows(inter, config, (8, 512) if weight_bytes == 1 else None)
    split_columns = math.ceil(inter / gemv_down_tile(config, weight_bytes)[1])
    down_iterations = math.ceil(split_columns / config.gemv_down_block_i)
    return gemv_stages_for(config, weight_bytes, 2 * math.ceil(inter / rows), rows, down_iterations)


@pytest.mark.parametrize(("world_size", "weight_bytes", "stages"), [
    # int8 gate_up: 1792 programs, more than one wave of 2-stage programs; down (split in 2): 14 iterations
    (1, 1, (1, 3)),
    (2, 1, (2, 3)),  # 896 programs fit in one wave with 2 stages; down 7 iterations
    (4, 1, (1, 2)),  # 8-row programs (their registers allow 8 per SM already); down 4 iterations
    (8, 1, (1, 1)),  # down 2 iterations
    (1, 2, (3, 3)),  # bf16: pipelined while down loops at least 4 times
    (2, 2, (3, 3)),
    (4, 2, (1, 1)),
    (8, 2, (1, 1)),
    (1, 4, (1, 1)),  # float32 weights (tests): not pipelined
])
def test_expert_kernels_pipeline_by_shard_shape(world_size: int, weight_bytes: int, stages: tuple[int, int]) -> None:
    assert mixtral_stages(world_size, weight_bytes, MoEConfig()) == stages
    assert mixtral_stages(world_size, weight_bytes, MoEConfig(gemv_stages=4)) == (4, 4)  # a set number: both


def test_int8_down_programs_take_taller_tiles_and_fewer_splits() -> None:
    config = MoEConfig()
    assert gemv_down_tile(config, 1) == (16, 2)
    assert gemv_down_tile(config, 2) == gemv_down_tile(config, 4) == (8, 4)
    assert gemv_down_tile(MoEConfig(gemv_int8_down_block_o=8, gemv_int8_split=4), 1) == (8, 4)


@pytest.mark.parametrize(("n", "k", "plan"), [
    (6144, 4096, (8, 512, 3)),  # Mixtral's wqkv on one GPU: pipelined 8 x 512 tiles, 768 programs
    (3072, 4096, (8, 512, 3)),  # over 2 ranks: 384
    (1536, 4096, (2, 2048, 1)),  # over 4 ranks 8-row tiles would leave 192 programs: the plain tile
    (768, 4096, (2, 2048, 1)),
    (4096, 512, (8, 512, 3)),  # wo over 8 ranks
    (32000, 4096, (8, 512, 3)),  # the output head
    (4096, 256, (16, 256, 1)),  # narrower than the pipelined tile: gemv_tile's
])
def test_one_token_linear_tiles_pipeline_where_the_weight_has_rows_enough(n: int, k: int,
                                                                           plan: tuple[int, int, int]) -> None:
    assert gemv_plan(n, k, LinearConfig()) == plan
    assert gemv_plan(n, k, LinearConfig(gemv_stages=2)) == (*gemv_tile(k, LinearConfig()), 2)  # a set number
