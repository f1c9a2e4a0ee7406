"""The fused Triton MoE kernels compute what the plain PyTorch definition computes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt_fast_mixtral.kernels.attention import (
    decode_attention,
    reference_decode_attention,
    reference_rope_and_cache_write,
    rope_cache_attention,
)
from gpt_fast_mixtral.kernels.linear import (
    PRELOAD_CONFIG,
    LinearConfig,
    int8_linear,
    linear,
    preloaded,
    reference_int8_linear,
)
from gpt_fast_mixtral.kernels.moe import (
    MoEConfig,
    block_rows,
    fused_moe,
    group_slots,
    reference_group_slots,
    reference_moe,
    rows_to_fp16,
)
from gpt_fast_mixtral.kernels.router import reference_residual_norm_route, residual_norm_route
from gpt_fast_mixtral.quantize import quantize_per_channel

pytestmark = pytest.mark.gpu

SHAPES = [  # tokens, experts, top_k, dim, intermediate (odd sizes exercise every mask)
    (1, 8, 2, 256, 512),
    (3, 5, 3, 96, 200),
    (17, 8, 2, 128, 352),
    (64, 7, 1, 160, 96),
    (40, 4, 4, 64, 64),
]


# Every kernel family on every shape: the tile kernels (tokens grouped by expert), the matrix-vector
# kernels used for a few (token, k) slots (one program per tile, or a persistent grid), and the grouped
# GEMM kernels for prefill (small tiles here, so
# that an expert spans several token tiles).
PATHS = {"tiled": MoEConfig(gemv_max_slots=0), "gemv": MoEConfig(gemv_max_slots=1 << 30),
         # int8 gate_up with bfloat16 activations: float32 products (the default takes float16 ones)
         "gemv_f32_products": MoEConfig(gemv_max_slots=1 << 30, gemv_int8_half2=False),
         # 7 programs looping over all the tiles (the persistent grid)
         "gemv_persistent": MoEConfig(gemv_max_slots=1 << 30, gemv_programs=7),
         # loads a few loop iterations ahead (cp.async through shared memory), short row blocks
         "gemv_pipelined": MoEConfig(gemv_max_slots=1 << 30, gemv_stages=3, gemv_block_d=64, gemv_down_block_i=64,
                                     gemv_block_i=4),
         "grouped": MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_block_m=32, grouped_block_n=32,
                              grouped_block_k=32, grouped_down_block_n=32, grouped_warps=4),
         "grouped_default_tiles": MoEConfig(gemv_max_slots=0, grouped_min_slots=0),
         "grouped_swap_ab": MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_block_m=32, grouped_block_n=64,
                                      grouped_block_k=32, grouped_down_block_n=64, grouped_warps=4,
                                      grouped_swap_ab=True)}
# int8 weights with bfloat16 activations: the grouped paths above on bfloat16 tensor cores, these on float16
# ones (kernels.moe's default; other inputs take the paths above)
for name in ("grouped", "grouped_default_tiles", "grouped_swap_ab"):
    PATHS[f"{name}_int8_fp16"] = dataclasses.replace(PATHS[name], grouped_int8_fp16=True)
    PATHS[name] = dataclasses.replace(PATHS[name], grouped_int8_fp16=False)


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


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shape,block", [(shape, (8, 32)) for shape in SHAPES] + [
    ((1, 8, 2, 1024, 512), (8, 512)), ((300, 8, 2, 1024, 512), (8, 512))])  # the engines' block
def test_fused_moe_reads_gate_and_up_weights_stored_in_blocks(shape, block, path):
    x, w1, w2, w3, weights, indices = make_inputs(*shape, torch.bfloat16, seed=11 + sum(shape))
    (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
    got = fused_moe(x, block_rows(q1, block), q2, block_rows(q3, block), weights, indices, scales=(s1, s2, s3),
                    config=PATHS[path], w13_block=block)
    expected = reference_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3))
    assert relative_error(got, expected) < 1e-2
    float_got = fused_moe(x.float(), block_rows(w1.float(), block), w2.float(), block_rows(w3.float(), block),
                          weights.float(), indices, config=PATHS[path], w13_block=block)
    assert relative_error(float_got, reference_moe(x.float(), w1.float(), w2.float(), w3.float(), weights.float(),
                                                   indices)) < 1e-5


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("magic", [True, False])
def test_slots_with_no_expert_add_nothing(path, magic):
    # Expert parallelism marks other ranks' experts -1 (weight 0); NaN weights prove they are never read.
    x, w1, w2, w3, weights, indices = make_inputs(6, 5, 2, 96, 200, torch.bfloat16, seed=3)
    indices, weights = indices.clone(), weights.clone()
    indices[0, 1] = indices[3, 0] = indices[5, 1] = -1
    weights[0, 1] = weights[3, 0] = weights[5, 1] = 0
    (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
    config = dataclasses.replace(PATHS[path], int8_magic=magic)
    got = fused_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3), config=config)
    expected = reference_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3))
    assert relative_error(got, expected) < 1e-2
    all_skipped = fused_moe(x[:1], q1, q2, q3, torch.zeros_like(weights[:1]), torch.full_like(indices[:1], -1),
                            scales=(s1, s2, s3), config=config)
    assert torch.equal(all_skipped, torch.zeros_like(x[:1]))


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_int8_conversion_trick_equals_plain_conversion(shape, path):
    x, w1, w2, w3, weights, indices = make_inputs(*shape, torch.bfloat16, seed=11 + sum(shape))
    quantized = [quantize_per_channel(w) for w in (w1, w2, w3)]
    # Every int8 value, so the conversion of each byte is exercised.
    quantized[0] = (torch.arange(quantized[0][0].numel(), device="cuda").remainder(255).sub(127)
                    .to(torch.int8).view_as(quantized[0][0]), quantized[0][1])
    weights_q, scales = [q for q, _ in quantized], tuple(s for _, s in quantized)
    results = [fused_moe(x, *weights_q, weights, indices, scales=scales,
                         config=dataclasses.replace(PATHS[path], int8_magic=magic)) for magic in (True, False)]
    assert relative_error(results[0], results[1].float()) < 1e-3


@pytest.mark.parametrize("path", ["grouped_int8_fp16", "grouped_swap_ab_int8_fp16"])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])  # 1e6: beyond float16's range unless scaled
def test_int8_fp16_experts_take_activations_of_any_magnitude(path, magnitude):
    x, w1, w2, w3, weights, indices = make_inputs(300, 8, 2, 256, 384, torch.bfloat16, seed=5)
    x = (x.float() * magnitude).to(torch.bfloat16)
    (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
    got = fused_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3), config=PATHS[path])
    bf16 = fused_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3), config=PATHS["grouped"])
    expected = reference_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3))
    assert torch.isfinite(got).all()
    assert relative_error(got, expected) < 1e-2
    assert relative_error(got, bf16.float()) < 1e-2


@pytest.mark.parametrize("block", [None, (8, 512)])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])
def test_half2_gate_up_takes_activations_of_any_magnitude(magnitude, block):
    """The one-token int8 gate_up with float16 products (MoEConfig.gemv_int8_half2) at Mixtral's hidden size,
    x with an outlier 50 times the rest: each row is scaled by a power of two into float16, so results
    stay finite and as close to the float32 reference as the float32 products' kernel."""
    x, w1, w2, w3, weights, indices = make_inputs(1, 8, 2, 4096, 1024, torch.bfloat16, seed=9)
    x = x.float() * magnitude
    x[0, 7] *= 50
    x = x.to(torch.bfloat16)
    (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
    w13 = [q if block is None else block_rows(q, block) for q in (q1, q3)]
    expected = reference_moe(x, q1, q2, q3, weights, indices, scales=(s1, s2, s3))
    results = [fused_moe(x, w13[0], q2, w13[1], weights, indices, scales=(s1, s2, s3), w13_block=block,
                         config=MoEConfig(gemv_int8_half2=half2)) for half2 in (True, False)]
    assert torch.isfinite(results[0]).all()
    errors = [relative_error(result, expected) for result in results]
    assert errors[0] < 5e-3 and errors[0] < 2 * errors[1] + 1e-3, errors

@pytest.mark.parametrize("slots,experts,top_k,block_m", [(4096, 8, 2, 128), (16384, 8, 2, 128), (999, 7, 3, 64),
                                                       (5, 8, 1, 128)])
def test_group_slots_kernel_equals_the_pytorch_version(slots, experts, top_k, block_m):
    generator = torch.Generator(device="cuda").manual_seed(slots)
    ids = torch.randint(-1, experts, (slots,), device="cuda", generator=generator)
    ids[: slots // 2] = 1  # one expert with many more slots than the others
    for got, expected in zip(group_slots(ids, experts, top_k, block_m),
                             reference_group_slots(ids, experts, top_k, block_m), strict=True):
        assert torch.equal(got, expected)


def test_rows_to_fp16_is_exact_for_bfloat16_rows():
    magnitudes = torch.tensor([1e-30, 1e-3, 1.0, 3e4, 1e6, 1e30, 0.0], device="cuda")
    x = (torch.randn(len(magnitudes), 14336, device="cuda") * magnitudes[:, None]).to(torch.bfloat16)
    expected = x.float()
    x16, scale = rows_to_fp16(x, out=x.view(torch.float16))  # in place, as the down projection's input
    assert torch.equal(x16.float() * scale[:, None], expected)


# one token: wqkv and wo of one GPU and of one of 8 ranks (narrower tiles, linear.gemv_tile), odd sizes
LINEAR_SHAPES = [(1, 40, 100), (1, 6144, 4096), (1, 768, 4096), (1, 4096, 512), (1, 50, 3000), (3, 96, 200),
                 (16, 130, 64), (9, 4096, 512)]


# 5 programs: a persistent grid; stages 3: loads two loop iterations ahead
@pytest.mark.parametrize("magic,programs,stages", [(True, 0, 1), (False, 0, 1), (True, 5, 1), (True, 0, 3)])
@pytest.mark.parametrize("rows,n,k", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_int8_linear_matches_reference(rows, n, k, dtype, bound, magic, programs, stages):
    generator = torch.Generator(device="cuda").manual_seed(rows + n + k)
    x = torch.randn(rows, k, device="cuda", generator=generator).to(dtype)
    weight, scales = quantize_per_channel(torch.randn(n, k, device="cuda", generator=generator))
    if n * k >= 255:  # every int8 value
        weight = torch.arange(n * k, device="cuda").remainder(255).sub(127).to(torch.int8).view(n, k)
    got = int8_linear(x, weight, scales, LinearConfig(int8_magic=magic, gemv_programs=programs, gemv_stages=stages,
                                                      gemv_block_k=2048 if stages == 1 else 512))
    assert got.dtype == dtype and got.shape == (rows, n)
    assert relative_error(got, reference_int8_linear(x, weight, scales)) < bound


# The default config's own choice (linear.gemv_plan): pipelined 8 x 512 tiles for wqkv over 1 or 2 ranks, wo
# over 8, the output head; the plain tile for wqkv over 8 ranks; odd sizes mask the last tile
@pytest.mark.parametrize("n,k", [(6144, 4096), (3072, 4096), (4096, 512), (32000, 4096), (768, 4096), (2051, 1000)])
def test_int8_linear_default_plan_matches_reference(n, k):
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=generator).to(torch.bfloat16)
    weight, scales = quantize_per_channel(torch.randn(n, k, device="cuda", generator=generator))
    assert relative_error(int8_linear(x, weight, scales), reference_int8_linear(x, weight, scales)) < 1e-2


# The whole-row preloading kernel (linear.PRELOAD_CONFIG, the attention's wo): Mixtral's wo on one GPU and
# over 2 and 8 ranks, K not a multiple of the chunk, rows not a multiple of the program's, 1- and 2-row
# programs; float32, bfloat16 and float16 activations, the 16-bit ones also on tensor cores
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 2048), (4096, 512), (2051, 1000), (37, 100), (100, 3000)])
@pytest.mark.parametrize("rows_a_program,mma,imma", [(4, False, False), (2, False, False), (1, False, False),
                                                     (4, True, False), (4, True, True)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_preloaded_int8_linear_matches_reference(n, k, rows_a_program, mma, imma, dtype, bound):
    """mma: 16-bit x on tensor cores (_preloaded_mma_kernel: 1, 2 or 4 slices by k; imma: on int8 tensor cores,
    _preloaded_imma_kernel), float32 x on the CUDA cores as without it."""
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=generator).to(dtype)
    weight, scales = quantize_per_channel(torch.randn(n, k, device="cuda", generator=generator))
    config = dataclasses.replace(PRELOAD_CONFIG, gemv_preload_rows=rows_a_program, gemv_preload_mma=mma,
                                 gemv_preload_imma=imma)
    assert preloaded(k, True, config)
    got = int8_linear(x, weight, scales, config)
    assert got.dtype == dtype and got.shape == (1, n)
    assert relative_error(got, reference_int8_linear(x, weight, scales)) < bound


@pytest.mark.parametrize("k", [4096, 2048, 1000])
def test_preloaded_int8_tensor_core_linear_edge_values(k):
    """_preloaded_imma_kernel (x as a 16-bit fixed-point number per slice): a slice of zeros, an element 1000
    times the others' size (y still within 16-bit rounding), and a NaN or an infinity (NaN rows)."""
    assert PRELOAD_CONFIG.gemv_preload_imma
    generator = torch.Generator(device="cuda").manual_seed(k)
    weight, scales = quantize_per_channel(torch.randn(300, k, device="cuda", generator=generator))
    x = torch.randn(1, k, device="cuda", generator=generator)
    x[0, k // 2:] = 0.0
    x[0, 3] = 1000.0
    for dtype in (torch.bfloat16, torch.float16):
        got = int8_linear(x.to(dtype), weight, scales, PRELOAD_CONFIG)
        assert relative_error(got, reference_int8_linear(x.to(dtype), weight, scales)) < 1e-2
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[0, k - 1] = bad
        assert int8_linear(x_bad.to(torch.bfloat16), weight, scales, PRELOAD_CONFIG).isnan().all()


def test_int8_linear_layer_uses_the_kernel_for_decode_and_cublas_for_prefill():
    from gpt_fast_mixtral.quantize import WeightOnlyInt8Linear

    for preload in (False, True):  # True: one token takes the preloading kernel
        layer = WeightOnlyInt8Linear(256, 96, device="cuda", preload=preload)
        layer.weight, layer.scales = quantize_per_channel(torch.randn(96, 256, device="cuda"))
        for tokens in (1, 4, 16, 17, 64):
            x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.bfloat16)[:1]
            expected = reference_int8_linear(x, layer.weight, layer.scales)
            assert relative_error(layer(x), expected) < 1e-2


# Float weights, one token (kernels.linear.linear): HALF_CONFIG's pipelined 4 x 1024 tiles (4096 rows and
# more), its 2 x 2048 ones (wqkv over 2 ranks), a K narrower than the tile (wo over 8 ranks), odd sizes
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (32000, 4096), (3072, 4096), (4096, 512), (50, 3000),
                                 (40, 100)])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_float_linear_matches_matmul(n, k, dtype, bound):
    generator = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, 1, k, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(n, k, device="cuda", generator=generator) * 0.02).to(dtype)
    got = linear(x, weight)
    assert got.dtype == dtype and got.shape == (1, 1, n)
    assert relative_error(got, x.float() @ weight.float().T) < bound


def test_model_linear_uses_the_kernel_for_one_token_and_cublas_otherwise(monkeypatch):
    from gpt_fast_mixtral import model
    from gpt_fast_mixtral.kernels import linear as linear_kernels

    calls = []
    monkeypatch.setattr(linear_kernels, "linear", lambda x, w: calls.append(x.shape) or linear(x, w))
    layer = model.Linear(256, 96, bias=False).to("cuda", torch.bfloat16)
    for shape in ((1, 1, 256), (1, 3, 256), (2, 1, 256)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ layer.weight.float().T
        assert relative_error(layer(x), expected) < 1e-2
    assert calls == [(1, 1, 256)]  # the one-token call only
    with pytest.raises(ValueError, match="one token"):
        linear(torch.randn(2, 256, device="cuda"), layer.weight.float())


ATTENTION_SHAPES = [  # batch, query heads, kv heads, cache slots, head_dim, filled lengths
    (3, 6, 2, 100, 32, [1, 37, 100]),
    (2, 6, 3, 50, 12, [3, 50]),
    (1, 32, 8, 8448, 128, [5000]),
    (2, 4, 4, 300, 64, [64, 299]),
]


@pytest.mark.parametrize("min_chunk", [64, 256])
@pytest.mark.parametrize("window", [None, 10, 4096])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_attention_matches_reference(shape, window, min_chunk, dtype, bound):
    batch, heads, kv_heads, slots, head_dim, lengths = shape
    generator = torch.Generator(device="cuda").manual_seed(slots + head_dim)
    q = torch.randn(batch, heads, head_dim, device="cuda", generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, slots, head_dim, device="cuda", generator=generator).to(dtype)
            for _ in range(2))
    lengths = torch.tensor(lengths, device="cuda")
    # Slots past a row's length hold garbage that must not be read.
    for b, length in enumerate(lengths.tolist()):
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("nan")
    expected = reference_decode_attention(q, k, v, lengths, window)
    counters = torch.zeros(batch, kv_heads, dtype=torch.int32, device="cuda")
    for _ in range(3):  # long rows: chunks finish in any order and the last combines; counters go back to 0
        got = decode_attention(q, k, v, lengths, window, counters, min_chunk=min_chunk, single_span=0)
        assert got.dtype == dtype and got.shape == q.shape
        assert relative_error(got, expected) < bound
        assert not counters.any()


def test_model_decode_step_with_the_attention_kernel_equals_sdpa(tmp_path):
    from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
    from gpt_fast_mixtral.model import Attention
    from gpt_fast_mixtral.tiny_model import make_tiny_model

    checkpoint = convert_checkpoint(make_tiny_model(tmp_path, seed=5, dtype=torch.float32, sliding_window=6))
    model = load_model(checkpoint, device="cuda", dtype=torch.float32)
    model.setup_caches(2, 32)
    tokens = torch.randint(3, model.args.vocab_size, (2, 12), device="cuda")
    logits = {}
    with torch.inference_mode():
        model(tokens[:, :10], torch.arange(10, device="cuda").expand(2, 10))
        positions = torch.tensor([[10], [4]], device="cuda")  # rows at different lengths
        for use_kernel in (True, False):
            Attention.decode_kernel = use_kernel
            try:
                logits[use_kernel] = model(tokens[:, 10:11], positions)
            finally:
                Attention.decode_kernel = True
    assert relative_error(logits[True], logits[False].float()) < 1e-5


ROUTER_SHAPES = [  # rows, dim, experts, top_k
    (1, 4096, 8, 2),
    (3, 96, 5, 3),
    (8, 200, 8, 1),
    (2, 1500, 16, 4),
    (300, 256, 7, 2),
]


@pytest.mark.parametrize("shape", ROUTER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_norm_route_matches_reference(shape, dtype):
    rows, dim, experts, top_k = shape
    generator = torch.Generator(device="cuda").manual_seed(sum(shape))
    x, delta = (torch.randn(rows, dim, device="cuda", generator=generator).to(dtype) for _ in range(2))
    norm_weight = (torch.rand(dim, device="cuda", generator=generator) + 0.5).to(dtype)
    gate_weight = (torch.randn(experts, dim, device="cuda", generator=generator) * dim ** -0.5).to(dtype)
    got = residual_norm_route(x, delta, norm_weight, 1e-5, gate_weight, top_k)
    expected = reference_residual_norm_route(x, delta, norm_weight, 1e-5, gate_weight, top_k)
    h, normed, weights, ids = got
    assert torch.equal(h, expected[0])  # the same add in the same dtype
    assert [t.dtype for t in got] == [t.dtype for t in expected] and ids.shape == (rows, top_k)
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(normed, expected[1].float()) < bound
    # Routing: the same experts except where two probabilities are within rounding of each other.
    agree = (ids == expected[3]).all(dim=1)
    assert agree.float().mean() > (0.999 if dtype == torch.float32 else 0.95)
    assert relative_error(weights[agree], expected[2][agree].float()) < bound


def test_model_with_the_fused_router_equals_the_plain_model(tmp_path):
    from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
    from gpt_fast_mixtral.model import TransformerBlock
    from gpt_fast_mixtral.tiny_model import make_tiny_model

    checkpoint = convert_checkpoint(make_tiny_model(tmp_path, seed=9, dtype=torch.float32))
    model = load_model(checkpoint, device="cuda", dtype=torch.float32)
    model.setup_caches(2, 32)
    tokens = torch.randint(3, model.args.vocab_size, (2, 11), device="cuda")
    logits = {}
    default = TransformerBlock.fused_router
    with torch.inference_mode():
        for fused in (True, False):
            TransformerBlock.fused_router = fused
            try:
                prefill = model(tokens[:, :10], torch.arange(10, device="cuda").expand(2, 10))
                logits[fused] = torch.cat([prefill, model(tokens[:, 10:11], torch.full((2, 1), 10, device="cuda"))], 1)
            finally:
                TransformerBlock.fused_router = default
    assert relative_error(logits[True], logits[False].float()) < 1e-5


@pytest.mark.parametrize("shape", [(1, 32, 8, 128, 1, 5000), (3, 4, 2, 16, 4, 40), (2, 6, 6, 40, 2, 700),
                                   (8, 8, 2, 64, 8, 300)])
@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_attention_matches_reference(shape, window, dtype):
    batch, n_heads, n_kv_heads, head_dim, cache_rows, slots = shape
    generator = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = torch.randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, device="cuda", generator=generator).to(dtype)
    table = torch.randn(slots, head_dim // 2, 2, device="cuda", generator=generator)  # as model.rope_tables
    positions = torch.randint(0, slots, (batch,), device="cuda", generator=generator)
    rope = table[positions]
    caches = [torch.randn(cache_rows, n_kv_heads, slots, head_dim, device="cuda", generator=generator).to(dtype)
              for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    got = rope_cache_attention(qkv, table[..., 0], table[..., 1], *caches, positions, n_heads, n_kv_heads,
                               head_dim, window)
    rotated_q = reference_rope_and_cache_write(qkv, rope[..., 0], rope[..., 1], *expected_caches, positions,
                                               n_heads, n_kv_heads, head_dim)
    expected = reference_decode_attention(rotated_q, *(c[:batch] for c in expected_caches), positions + 1, window)
    # The same float32 rotation rounded once (equal up to fused multiply-adds), then attention.
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and got.shape == (batch, n_heads, head_dim)
    assert relative_error(got, expected) < bound
    assert relative_error(caches[0], expected_caches[0].float()) < bound
    assert torch.equal(caches[1], expected_caches[1])  # values are copied


def test_model_decode_with_the_fused_rope_and_cache_write_equals_the_plain_step(tmp_path):
    from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
    from gpt_fast_mixtral.model import Attention
    from gpt_fast_mixtral.tiny_model import make_tiny_model

    checkpoint = convert_checkpoint(make_tiny_model(tmp_path, seed=4, dtype=torch.float32, sliding_window=6))
    model = load_model(checkpoint, device="cuda", dtype=torch.float32)
    tokens = torch.randint(3, model.args.vocab_size, (2, 13), device="cuda")
    logits = {}
    default = Attention.fused_rope_cache
    with torch.inference_mode():
        for fused in (True, False):
            model.max_batch_size = 0  # fresh caches
            model.setup_caches(2, 32)
            model(tokens[:, :10], torch.arange(10, device="cuda").expand(2, 10))
            Attention.fused_rope_cache = fused
            try:
                steps = [model(tokens[:, 10 + i:11 + i], torch.tensor([[10 + i], [4 + i]], device="cuda"))
                         for i in range(3)]  # rows at different lengths, three steps through the caches
            finally:
                Attention.fused_rope_cache = default
            logits[fused] = torch.cat(steps, dim=1)
    assert relative_error(logits[True], logits[False].float()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,vocab", [(1, 32000), (3, 7), (5, 16385), (2, 40000)])
def test_greedy_state_equals_torch_argmax_and_clamped_positions(batch, vocab, dtype):
    from gpt_fast_mixtral.kernels.argmax import greedy_state, reference_greedy_state

    generator = torch.Generator(device="cuda").manual_seed(vocab)
    logits = torch.randn(batch, vocab, device="cuda", generator=generator).to(dtype)
    logits[0, vocab // 2:] = logits[0].max()  # a tie: the first index of the largest wins
    if batch > 1:
        logits[1] = float("-inf")
    if batch > 2:
        logits[2, [vocab - 1, vocab // 3]] = float("nan")  # the first NaN wins
    positions = torch.arange(batch, device="cuda", dtype=torch.int64) * 3 + 4
    expected = reference_greedy_state(logits, positions, 6)
    assert torch.equal(greedy_state(logits, positions, 6), expected)
    wide = torch.empty(batch, vocab + 5, device="cuda", dtype=dtype)[:, :vocab]  # rows with a stride
    wide.copy_(logits)
    assert torch.equal(greedy_state(wide, positions, 6), expected)


def test_greedy_state_in_a_compiled_cuda_graph_step_equals_torch():
    from gpt_fast_mixtral.kernels.argmax import greedy_state, reference_greedy_state

    weight = torch.randn(3000, 64, device="cuda", dtype=torch.bfloat16)

    def step(x, positions):
        logits = linear(x, weight)[None]  # the kernels' chain as a decode step ends it
        return greedy_state(logits, positions, 9), logits

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for position in (3, 8, 9):
        x = torch.randn(64, device="cuda", dtype=torch.bfloat16)
        positions = torch.tensor([position], device="cuda")
        state, logits = compiled(x, positions)
        assert torch.equal(state, reference_greedy_state(logits, positions, 9))
        assert torch.equal(state[1], torch.tensor([min(position + 1, 9)], device="cuda"))
