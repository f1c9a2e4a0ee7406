"""The grouped MoE kernels' tiling (kernels/moe.py expert_tiles) covers every routed row exactly once."""

from __future__ import annotations

import pytest
import torch

from gpt_fast_mixtral.kernels.moe import expert_tiles


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
