"""The fused Triton MoE kernels compute what the plain PyTorch definition computes."""

from __future__ import annotations

import pytest
import torch

from gpt_fast_mixtral.kernels.moe import MoEConfig, fused_moe, reference_moe
from gpt_fast_mixtral.quantize import quantize_per_channel

pytestmark = pytest.mark.gpu

SHAPES = [  # tokens, experts, top_k, dim, intermediate (odd sizes exercise every mask)
    (1, 8, 2, 256, 512),
    (3, 5, 3, 96, 200),
    (17, 8, 2, 128, 352),
    (64, 7, 1, 160, 96),
    (40, 4, 4, 64, 64),
]


# Both kernel families on every shape: the tile kernels (tokens grouped by expert) and the
# matrix-vector kernels used for a few (token, k) slots.
PATHS = {"tiled": MoEConfig(gemv_max_slots=0), "gemv": MoEConfig(gemv_max_slots=1 << 30)}


def make_inputs(tokens, experts, top_k, dim, inter, dtype, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=generator) * scale).to(dtype)

    x = randn(tokens, dim)
    w1, w3 = randn(experts, inter, dim, scale=dim ** -0.5), randn(experts, inter, dim, scale=dim ** -0.5)
    w2 = randn(experts, dim, inter, scale=inter ** -0.5)
    logits = torch.randn(tokens, experts, device="cuda", generator=generator)
    weights, indices = logits.softmax(-1).topk(top_k, dim=-1)
    return x, w1, w2, w3, (weights / weights.sum(-1, keepdim=True)).to(dtype), indices


def relative_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_moe_matches_reference(shape, dtype, bound, path):
    x, w1, w2, w3, weights, indices = make_inputs(*shape, dtype, seed=sum(shape))
    got = fused_moe(x, w1, w2, w3, weights, indices, config=PATHS[path])
    assert got.dtype == dtype and got.shape == x.shape
    assert relative_error(got, reference_moe(x, w1, w2, w3, weights, indices)) < bound


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_moe_int8_matches_dequantized_reference(shape, path):
    x, w1, w2, w3, weights, indices = make_inputs(*shape, torch.bfloat16, seed=7 + sum(shape))
    (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
    got = fused_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3), config=PATHS[path])
    expected = reference_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3))
    assert relative_error(got, expected) < 1e-2


def test_one_expert_taking_more_tokens_than_a_block():
    x, w1, w2, w3, weights, indices = make_inputs(50, 4, 2, 64, 96, torch.float32, seed=1)
    indices = torch.stack([torch.zeros(50, dtype=torch.long), torch.full((50,), 3)], dim=1).cuda()
    got = fused_moe(x, w1, w2, w3, weights, indices)
    assert relative_error(got, reference_moe(x, w1, w2, w3, weights, indices)) < 1e-5
