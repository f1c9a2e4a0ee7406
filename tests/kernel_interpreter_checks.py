"""The GPU kernels against their PyTorch references on the CPU, through Triton's interpreter.

Run by tests/test_kernels_cpu.py in a fresh process (TRITON_INTERPRET must be set before the kernels are
defined). Float32 only: the interpreter's bfloat16 dots are not exact. Prints one line per check and
"all kernel checks passed" at the end; any mismatch raises.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gpt_fast_mixtral import model as model_module  # noqa: E402
from gpt_fast_mixtral.config import ModelArgs  # noqa: E402
from gpt_fast_mixtral.kernels import allreduce, argmax, attention, linear, moe, pdl, router  # noqa: E402
from gpt_fast_mixtral.quantize import quantize_per_channel  # noqa: E402

TOLERANCE = 1e-5


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def moe_inputs(tokens: int, experts: int, top_k: int, dim: int, inter: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=generator)
    w1, w3 = (torch.randn(experts, inter, dim, generator=generator) * dim ** -0.5 for _ in range(2))
    w2 = torch.randn(experts, dim, inter, generator=generator) * inter ** -0.5
    weights, ids = torch.randn(tokens, experts, generator=generator).softmax(-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    ids[::3, 0] = -1  # slots with no expert (expert parallelism) add nothing
    weights[::3, 0] = 0
    return x, w1, w2, w3, weights, ids


def check_moe(name: str, config: moe.MoEConfig, shapes: list[tuple[int, ...]],
              block: tuple[int, int] | None = None) -> None:
    """block: w1 and w3 go to the kernels stored in blocks (moe.block_rows)."""
    def stored(w):
        return w if block is None else moe.block_rows(w, block)

    for shape in shapes:
        x, w1, w2, w3, weights, ids = moe_inputs(*shape, seed=sum(shape))
        error = relative_error(moe.fused_moe(x, stored(w1), w2, stored(w3), weights, ids, config=config,
                                             w13_block=block),
                               moe.reference_moe(x, w1, w2, w3, weights, ids))
        (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
        error_int8 = relative_error(moe.fused_moe(x, stored(q1), q2, stored(q3), weights, ids, scales=(s1, s2, s3),
                                                  config=config, w13_block=block),
                                    moe.reference_moe(x, q1, q2, q3, weights, ids, scales=(s1, s2, s3)))
        print(f"{name}{'' if block is None else f' {block} blocks'} {shape}: float32 {error:.1e}, "
              f"int8 {error_int8:.1e}")
        assert error < TOLERANCE and error_int8 < TOLERANCE, name



def check_half2_gate_up() -> None:
    """The int8 decode gate_up with float16 products (MoEConfig.gemv_int8_half2) for 16-bit activations,
    whole fused_moe against the float32 reference: row-major and blocked w1 / w3, masked rows and
    columns, no-expert slots (id -1), x of any magnitude (the kernel scales each row by a power of
    two), x of zeros, and the worst case for overflow (every weight -128, x at its maximum everywhere)."""
    gemv = dict(gemv_max_slots=1 << 30, gemv_block_d=64, gemv_down_block_i=64)
    bound = 4e-3  # a 16-bit path: x and h rounded to 16 bits, products summed in float16 over the loop
    # |x| from large to small (h ~ x**2 must stay within float16's range for float16 activations)
    for dtype, large, small in ((torch.float16, 50.0, 1e-2), (torch.bfloat16, 1e4, 1e-4)):
        for shape, block, magnitude in [((3, 5, 3, 96, 200), None, 1.0), ((1, 8, 2, 64, 256), (4, 32), large),
                                        ((2, 6, 2, 40, 130), None, small), ((1, 4, 2, 64, 512), (8, 64), 3.0)]:
            x, w1, w2, w3, weights, ids = moe_inputs(*shape, seed=sum(shape))
            x = (x * magnitude).to(dtype)
            (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
            w13 = [q if block is None else moe.block_rows(q, block) for q in (q1, q3)]
            expected = moe.reference_moe(x, q1, q2, q3, weights, ids, scales=(s1, s2, s3))
            errors = {}
            for half2 in (True, False):
                got = moe.fused_moe(x, w13[0], q2, w13[1], weights.to(dtype), ids, scales=(s1, s2, s3),
                                    config=moe.MoEConfig(gemv_int8_half2=half2, **gemv), w13_block=block)
                errors[half2] = relative_error(got, expected)
            print(f"half2 gate_up {dtype} {shape} blocks {block} |x| ~{magnitude:g}: {errors[True]:.1e} "
                  f"(float32 products {errors[False]:.1e})")
            assert errors[True] < bound and errors[False] < bound, errors
    # The largest sums: every weight -128 and x at its maximum everywhere, so each float16 element adds
    # 128 * X_LIMIT per iteration (8 of them here): finite, within float16's rounding.
    tokens, experts, dim, inter = 1, 2, 512, 16
    x = torch.full((tokens, dim), -3.0e4, dtype=torch.float16)
    w13 = torch.full((experts, inter, dim), -128, dtype=torch.int8)
    scale = torch.full((experts, inter), 1e-7)
    h = torch.empty(tokens, inter, dtype=torch.float32)
    moe._gate_up_gemv_kernel[(1, inter // 8)](
        x, w13, w13, scale, scale, h, torch.tensor([1]), 1, 0, dim, inter, x.stride(0), w13.stride(0),
        w13.stride(1), scale.stride(0), h.stride(0), HAS_SCALES=True, MAGIC=True, BLOCK_I=8, BLOCK_D=64,
        PERSISTENT=False, HALF2=True, X_BLOCK=512, X_LIMIT=moe.half2_x_limit(dim, 64))
    gate = 128 * 3.0e4 * dim * 1e-7  # up == gate; h = silu(gate) * up
    assert torch.allclose(h, torch.full_like(h, gate * gate / (1 + math.exp(-gate))), rtol=bound), h
    ones = torch.ones(experts, inter, dim, dtype=torch.int8)
    got = moe.fused_moe(torch.zeros(tokens, dim, dtype=torch.bfloat16), ones, ones.transpose(1, 2).contiguous(),
                        ones, torch.ones(tokens, 1, dtype=torch.bfloat16), torch.tensor([[1]]),
                        scales=(scale, torch.ones(experts, dim), scale), config=moe.MoEConfig(**gemv))
    assert torch.equal(got, torch.zeros_like(got)), got
    print("half2 gate_up: the largest sums stay finite, x of zeros gives zeros")

def check_block_end() -> None:
    """The gemv path ending the block (fused_moe's `end`: residual + the experts' sum and its RMSNorm) and
    block_end alone on a row wider than one block (its two-pass form), against the model's functions."""
    config = moe.MoEConfig(gemv_max_slots=1 << 30, gemv_block_d=64, gemv_down_block_i=64)
    for tokens, experts, top_k, dim, inter in [(1, 8, 2, 96, 200), (3, 5, 3, 64, 128)]:
        x, w1, w2, w3, weights, ids = moe_inputs(tokens, experts, top_k, dim, inter, seed=dim)
        residual, norm_weight = torch.randn(tokens, dim), torch.rand(dim) + 0.5
        out, normed = moe.fused_moe(x, w1, w2, w3, weights, ids, config=config,
                                    end=moe.BlockEnd(residual, norm_weight, 1e-5))
        expected = residual + moe.reference_moe(x, w1, w2, w3, weights, ids)
        assert relative_error(out, expected) < TOLERANCE, "block end: out"
        assert relative_error(normed, model_module.rms_norm(out, norm_weight, 1e-5)) < TOLERANCE, "block end: norm"
        print(f"moe block end {(tokens, experts, top_k, dim, inter)}: equal")
    generator = torch.Generator().manual_seed(7)
    for dim in (9000, 100):
        partials = torch.randn(3, 4, dim, generator=generator)  # [split, tokens * top_k, D]
        residual, norm_weight = torch.randn(2, dim, generator=generator), torch.rand(dim, generator=generator)
        summed = partials.sum(0).view(2, 2, dim).sum(1)
        out, normed = moe.block_end(partials, 2, torch.float32, moe.BlockEnd(residual, norm_weight, 1e-6))
        assert torch.allclose(out, residual + summed, rtol=1e-5, atol=1e-5), "block end: two passes"
        assert torch.allclose(normed, model_module.rms_norm(out, norm_weight, 1e-6), rtol=1e-5, atol=1e-5)
        assert torch.allclose(moe.block_end(partials, 2, torch.float32), summed, rtol=1e-5, atol=1e-5)
        print(f"block end of {dim} columns: equal")


def greedy_state_cases(generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """Logits [B, V] with what torch.argmax decides specially: ties (the first index wins), NaNs (the first
    NaN wins), rows of -inf, a largest value in the last column, vocabularies not a multiple of a block."""
    cases = []
    for vocab in (1, 7, 300, 20000):
        logits = torch.randn(4, vocab, generator=generator)
        logits[1] = 0.5  # a tie of every column
        logits[2] = float("-inf")
        logits[3, -1] = 100.0
        cases.append((f"{vocab} columns", logits))
    nan = torch.randn(3, 20000, generator=generator)
    nan[0, 17000] = float("nan")
    nan[1, [5, 16390]] = float("nan")
    nan[2, [16390, 3]] = float("inf")  # a tie at +inf across the two passes
    cases.append(("NaN and inf", nan))
    return cases


def check_greedy_state() -> None:
    """kernels.argmax.greedy_state against torch.argmax and the clamped increment, float32 and bfloat16."""
    generator = torch.Generator().manual_seed(11)
    for name, logits in greedy_state_cases(generator):
        positions = torch.arange(logits.shape[0], dtype=torch.int64) * 5 + 3
        for dtype in (torch.float32, torch.bfloat16):
            rows = logits.to(dtype)
            got = argmax._greedy_state(rows, positions, 8)
            assert torch.equal(got, argmax.reference_greedy_state(rows, positions, 8)), (name, dtype, got)
        print(f"greedy state {name}: equal")


def check_rows_to_fp16() -> None:
    """Rows of very different magnitudes (and a zero row) to float16 and back, out of place and in place."""
    magnitudes = torch.tensor([1e-30, 1e-3, 1.0, 3e4, 1e6, 1e30, 0.0])
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(len(magnitudes), 300, generator=generator) * magnitudes[:, None]).to(torch.bfloat16)
    x16, scale = moe.rows_to_fp16(x)
    assert x16.dtype == torch.float16 and torch.equal(x16.float() * scale[:, None], x.float())
    in_place = x.clone()
    x16, scale = moe.rows_to_fp16(in_place, out=in_place.view(torch.float16))
    assert x16.data_ptr() == in_place.data_ptr() and torch.equal(x16.float() * scale[:, None], x.float())
    # every row's largest magnitude lands in [2**14, 2**15)
    amax = x16.float().abs().amax(dim=1)[:-1]
    assert bool(((amax >= 2 ** 14) & (amax < 2 ** 15)).all()) and float(scale[-1]) == 1.0
    print("rows to float16: exact")


def check_grouped_int8_fp16() -> None:
    """int8 experts through float16 grouped GEMMs (bfloat16 activations scaled per row, here of 1e6, which
    float16 could not hold unscaled) against the float32 reference of the same bfloat16 inputs."""
    config = moe.MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_int8_fp16=True, grouped_block_m=32,
                           grouped_block_n=32, grouped_block_k=32, grouped_fp16_down_block_n=32,
                           grouped_fp16_gate_up_block_n=32)
    for shape in [(3, 5, 3, 96, 200), (50, 8, 2, 64, 128)]:
        x, w1, w2, w3, weights, ids = moe_inputs(*shape, seed=sum(shape))
        x = (x * 1e6).to(torch.bfloat16)
        (q1, s1), (q2, s2), (q3, s3) = (quantize_per_channel(w) for w in (w1, w2, w3))
        got = moe.fused_moe(x, q1, q2, q3, weights.to(torch.bfloat16), ids, scales=(s1, s2, s3), config=config)
        expected = moe.reference_moe(x, q1, q2, q3, weights.to(torch.bfloat16), ids, scales=(s1, s2, s3))
        error = relative_error(got, expected)
        # (the interpreter rounds float32 to bfloat16 towards zero: twice the GPU's error)
        print(f"grouped int8 x float16 {shape}: {error:.1e}")
        assert got.dtype == torch.bfloat16 and error < 1e-2


def check_group_slots() -> None:
    """The one-kernel counting sort and tiling equal the PyTorch version (ids < 0 included)."""
    for slots, experts, top_k, block_m in [(4096, 8, 2, 128), (1001, 5, 1, 32), (700, 16, 4, 64), (3, 8, 3, 128)]:
        generator = torch.Generator().manual_seed(slots)
        ids = torch.randint(-1, experts, (slots,), generator=generator)
        ids[: slots // 3] = torch.randint(0, 2, (slots // 3,), generator=generator)  # uneven experts
        got = moe.group_slots(ids, experts, top_k, block_m)
        expected = moe.reference_group_slots(ids, experts, top_k, block_m)
        for name, a, b in zip(("order", "counts", "offsets", "slot_token", "tile_expert", "tile_row", "tile_end"),
                              got, expected, strict=True):
            assert a.dtype == torch.int32 and torch.equal(a, b), name
        print(f"group slots ({slots}, {experts}, {top_k}, {block_m}): equal")


def check_rope_rows() -> None:
    for tokens, n_heads, n_kv_heads, head_dim in [(5, 6, 2, 96), (3, 4, 4, 16)]:
        generator = torch.Generator().manual_seed(head_dim)
        qkv = torch.randn(tokens, (n_heads + 2 * n_kv_heads) * head_dim, generator=generator)
        angles = torch.rand(tokens, head_dim // 2, generator=generator) * 6
        table = torch.stack([angles.cos(), angles.sin()], dim=-1)
        got = attention.rope_rows(qkv, table[..., 0], table[..., 1], n_heads, n_kv_heads, head_dim)
        heads = n_heads + n_kv_heads
        expected = model_module.apply_rope(qkv[:, :heads * head_dim].view(1, tokens, heads, head_dim),
                                           table[None, :, None, :, 0], table[None, :, None, :, 1])
        assert torch.allclose(got, expected.view(tokens, -1), atol=1e-6), "rope rows"
        print(f"rope rows ({tokens}, {n_heads}, {n_kv_heads}, {head_dim}): equal")


def check_int8_linear() -> None:
    persistent = linear.LinearConfig(gemv_programs=3)
    pipelined = linear.LinearConfig(gemv_block_k=256, gemv_stages=3)  # products summed after the loop
    summed_each_iteration = linear.LinearConfig(gemv_block_k=256, gemv_stages=3, gemv_pipelined_defer=False)
    three_early_tiles = linear.LinearConfig(gemv_block_k=256, gemv_stages=3, gemv_pdl_tiles=3)  # PDL's early loads
    # the whole-row preloading kernel (linear.PRELOAD_CONFIG): K over several chunks with a masked last one,
    # K below one chunk, rows not a multiple of the program's; 2 tokens take the ordinary 16-row tile
    preload_4 = linear.LinearConfig(gemv_preload_rows=4, gemv_preload_block_k=128)
    preload_1 = linear.LinearConfig(gemv_preload_rows=1, gemv_preload_block_k=64)
    for rows, n, k, config in [(1, 40, 100, linear.DEFAULT_CONFIG), (1, 40, 100, persistent),
                               (1, 40, 1000, pipelined), (1, 40, 1000, summed_each_iteration),
                               (1, 40, 1000, three_early_tiles), (1, 40, 600, three_early_tiles),
                               (1, 40, 3000, linear.DEFAULT_CONFIG),
                               (3, 96, 200, linear.DEFAULT_CONFIG),  # matrix-vector (one token), 16-row tile
                               (1, 37, 300, preload_4), (1, 10, 50, preload_1), (1, 9, 200, linear.PRELOAD_CONFIG),
                               (2, 9, 200, linear.PRELOAD_CONFIG)]:
        assert linear.preloaded(k, True, config) == (config.gemv_preload_rows > 0)
        generator = torch.Generator().manual_seed(n + k)
        weight, scales = quantize_per_channel(torch.randn(n, k, generator=generator))
        x = torch.randn(rows, k, generator=generator)
        error = relative_error(linear.int8_linear(x, weight, scales, config),
                               linear.reference_int8_linear(x, weight, scales))
        print(f"int8 linear ({rows}, {n}, {k}, programs {config.gemv_programs}, stages {config.gemv_stages}, "
              f"deferred {config.gemv_pipelined_defer}, preloaded rows {config.gemv_preload_rows}): {error:.1e}")
        assert error < TOLERANCE
    # the preloading kernel on tensor cores (PRELOAD_CONFIG with 16-bit x): one slice, 2 and 4 slices with a
    # masked last chunk and rows not a multiple of 16, narrow slices (8 of 128 columns); float16 (the
    # interpreter's bfloat16 dots are not exact), so the bound is float16's rounding of y; on int8 tensor cores
    # (PRELOAD_CONFIG's choice: x in 16-bit fixed point, the int8 products exact) bfloat16 too
    narrow = dataclasses.replace(linear.PRELOAD_CONFIG, gemv_preload_mma_slice=128, gemv_preload_mma_block_k=64)
    for n, k, config in [(40, 100, linear.PRELOAD_CONFIG), (37, 3000, linear.PRELOAD_CONFIG),
                         (50, 2048, linear.PRELOAD_CONFIG), (33, 1000, narrow)]:
        assert config.gemv_preload_imma
        for imma, dtype, bound in [(False, torch.float16, 1e-3), (True, torch.float16, 1e-3),
                                   (True, torch.bfloat16, 1e-2)]:
            generator = torch.Generator().manual_seed(n + k)
            weight, scales = quantize_per_channel(torch.randn(n, k, generator=generator))
            x = torch.randn(1, k, generator=generator).to(dtype)
            config = dataclasses.replace(config, gemv_preload_imma=imma)
            got = linear.int8_linear(x, weight, scales, config)
            error = relative_error(got, linear.reference_int8_linear(x, weight, scales))
            print(f"int8 linear on {'int8' if imma else 'float16'} tensor cores (1, {n}, {k}, {dtype}, plan "
                  f"{linear.preload_mma_plan(k, config)}): {error:.1e}")
            assert got.dtype == dtype and error < bound
    # int8 tensor cores: a slice of zeros gives zeros, a NaN or an infinity NaN rows (as the reference's NaN /
    # infinite rows), and one element 1000 times the others' size still leaves y within bfloat16's rounding
    generator = torch.Generator().manual_seed(7)
    weight, scales = quantize_per_channel(torch.randn(20, 2048, generator=generator))
    x = torch.randn(1, 2048, generator=generator)
    x[0, 1024:] = 0.0  # the second slice
    got = linear.int8_linear(x.to(torch.bfloat16), weight, scales, linear.PRELOAD_CONFIG)
    assert relative_error(got, linear.reference_int8_linear(x.to(torch.bfloat16), weight, scales)) < 1e-2
    for bad in (float("nan"), float("inf")):
        x_bad = x.clone()
        x_bad[0, 5] = bad
        assert linear.int8_linear(x_bad.to(torch.float16), weight, scales, linear.PRELOAD_CONFIG).isnan().all()
    x_outlier = x.clone()
    x_outlier[0, 3] = 1000.0
    x_outlier = x_outlier.to(torch.bfloat16)
    error = relative_error(linear.int8_linear(x_outlier, weight, scales, linear.PRELOAD_CONFIG),
                           linear.reference_int8_linear(x_outlier, weight, scales))
    print(f"int8 tensor cores, x with an element 1000x the others: {error:.1e}")
    assert error < 1e-2
    # float weights, one token: 16-bit ones with HALF_CONFIG's tiles (bf16 loads and casts are exact in the
    # interpreter; the products are float32), float32 with DEFAULT_CONFIG's; a pipelined plan and a K
    # narrower than the tile
    for dtype, n, k, config in [(torch.bfloat16, 40, 3000, None), (torch.float32, 40, 100, None),
                                (torch.float16, 24, 1000, linear.LinearConfig(gemv_block_k=256, gemv_stages=3))]:
        generator = torch.Generator().manual_seed(n + k)
        weight = torch.randn(n, k, generator=generator).to(dtype)
        x = torch.randn(1, 1, k, generator=generator).to(dtype)
        got = linear.linear(x, weight, config)
        assert got.shape == (1, 1, n) and got.dtype == dtype
        error = relative_error(got, x.float() @ weight.float().T)
        print(f"{dtype} linear (1, {n}, {k}): {error:.1e}")
        assert error < (TOLERANCE if dtype == torch.float32 else 1e-2)
    weight, scales = quantize_per_channel(torch.randn(37, 1500))
    assert torch.equal(linear.dequantize(weight, scales, torch.float32), weight.float() * scales.float()[:, None])
    print("dequantize: equal")


def check_router() -> None:
    # one pass over the row (the first three) and in chunks (8 x 9000 router weights)
    for rows, dim, experts, top_k in [(1, 4096, 8, 2), (3, 96, 5, 3), (2, 1500, 16, 4), (2, 9000, 8, 2),
                                      (0, 64, 4, 2)]:
        generator = torch.Generator().manual_seed(rows + dim)
        x, delta = torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator)
        norm_weight = torch.rand(dim, generator=generator) + 0.5
        gate = torch.randn(experts, dim, generator=generator) * dim ** -0.5
        got = router.residual_norm_route(x, delta, norm_weight, 1e-5, gate, top_k)
        expected = router.reference_residual_norm_route(x, delta, norm_weight, 1e-5, gate, top_k)
        assert torch.equal(got[3], expected[3]), "expert ids"
        for a, b in zip(got[:3], expected[:3], strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        print(f"router ({rows}, {dim}, {experts}, {top_k}): equal")


def check_decode_attention() -> None:
    """Rows of different lengths, with and without a sliding window, in one chunk and in several (which
    the last program combines); with the rotary embedding and cache write (rope_cache_attention)."""
    for (batch, heads, kv_heads, slots, head_dim, lengths), window, min_chunk in [
            ((3, 6, 2, 100, 32, [1, 37, 100]), None, 64), ((3, 6, 2, 100, 32, [1, 37, 100]), 10, 16),
            ((2, 6, 3, 50, 12, [3, 50]), None, 16), ((2, 4, 4, 300, 64, [64, 299]), 70, 64),
            ((1, 8, 2, 600, 16, [600]), None, 256), ((2, 4, 2, 300, 16, [257, 33]), None, 256),
            ((2, 4, 1, 300, 16, [290, 2]), 33, 16),
            # 3 query heads a kv head (one padding head in the combine) and 25 chunks: two combining steps
            ((1, 6, 2, 400, 16, [400]), None, 16)]:
        generator = torch.Generator().manual_seed(slots + head_dim)
        q = torch.randn(batch, heads, head_dim, generator=generator)
        k, v = (torch.randn(batch + 1, kv_heads, slots, head_dim, generator=generator) for _ in range(2))
        lengths_t = torch.tensor(lengths)
        for b, length in enumerate(lengths):  # slots past a row's length must not be read
            k[b, :, length:] = float("nan")
            v[b, :, length:] = float("nan")
        counters = torch.zeros(batch, kv_heads, dtype=torch.int32)
        got = attention.decode_attention(q, k, v, lengths_t, window, counters, block_s=16, min_chunk=min_chunk,
                                         single_span=0)
        expected = attention.reference_decode_attention(q, k[:batch], v[:batch], lengths_t, window)
        error = relative_error(got, expected)
        print(f"decode attention {lengths} window {window} chunks >= {min_chunk}: {error:.1e}")
        assert error < TOLERANCE and not counters.any()

        qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=generator)
        positions = lengths_t - 1
        table = torch.randn(slots, head_dim // 2, 2, generator=generator)
        rope = table[positions]
        caches = [torch.randn(batch + 1, kv_heads, slots, head_dim, generator=generator) for _ in range(2)]
        expected_caches = [c.clone() for c in caches]
        got = attention.rope_cache_attention(qkv, table[..., 0], table[..., 1], *caches, positions, heads,
                                             kv_heads, head_dim, window, block_s=16, min_chunk=min_chunk,
                                             single_span=0)
        rotated_q = attention.reference_rope_and_cache_write(qkv, rope[..., 0], rope[..., 1], *expected_caches,
                                                             positions, heads, kv_heads, head_dim)
        expected = attention.reference_decode_attention(rotated_q, *(c[:batch] for c in expected_caches), lengths_t,
                                                        window)
        error = relative_error(got, expected)
        print(f"rope, cache write and attention {lengths}: {error:.1e}")
        assert error < TOLERANCE and torch.allclose(caches[0], expected_caches[0], atol=1e-6)
        assert torch.equal(caches[1], expected_caches[1])

    # A row of at most single_span slots (within its window) is one chunk, whatever min_chunk says: it never
    # touches its counter, so a counter left at a stray value does not change its output (a chunked row's
    # last program would never see its ticket and never write the output).
    for lengths, window, single_span in (([40, 17], None, 40), ([90, 60], 40, 40), ([33, 1], None, 48)):
        generator = torch.Generator().manual_seed(len(lengths) + lengths[0])
        batch, heads, kv_heads, head_dim = len(lengths), 4, 2, 16
        q = torch.randn(batch, heads, head_dim, generator=generator)
        k, v = (torch.randn(batch, kv_heads, 100, head_dim, generator=generator) for _ in range(2))
        lengths_t = torch.tensor(lengths)
        counters = torch.full((batch, kv_heads), 7, dtype=torch.int32)
        got = attention.decode_attention(q, k, v, lengths_t, window, counters, block_s=16, min_chunk=16,
                                         single_span=single_span)
        error = relative_error(got, attention.reference_decode_attention(q, k, v, lengths_t, window))
        print(f"decode attention {lengths} window {window} one chunk up to {single_span} slots: {error:.1e}")
        assert error < TOLERANCE and (counters == 7).all()


def check_model_decode_step(rows: int = 2, experts: bool = False) -> None:
    """A decode step of `rows` rows through the attention kernel, the fused rope/cache write and the fused
    router (and with `experts` the fused MoE kernels), against the PyTorch path (rows at different
    lengths, a sliding window)."""
    args = ModelArgs(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                     num_experts=5, num_experts_per_tok=2, sliding_window=5)
    torch.manual_seed(0)
    model = model_module.Transformer(args)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    tokens = torch.randint(0, 300, (rows, 9))
    modules = (attention, router, linear, moe) if experts else (attention, router, linear)
    available = {module: module.available for module in modules}
    logits = {}
    fused_calls = []
    fused_attention = attention.rope_cache_attention
    attention.rope_cache_attention = lambda *a, **k: fused_calls.append(a[1].shape) or fused_attention(*a, **k)
    try:
        with torch.no_grad():
            for kernels in (False, True):
                for module in modules:
                    module.available = lambda x, on=kernels: on  # the interpreter runs the kernels on the CPU
                model_module.Attention.fused_rope_cache = model_module.TransformerBlock.fused_router = kernels
                model.max_batch_size = 0  # fresh caches
                model.setup_caches(rows, 32)
                model(tokens[:, :8], torch.arange(8).repeat(rows, 1))
                logits[kernels] = model(tokens[:, 8:], torch.tensor([[8], [3]])[:rows])
    finally:
        attention.rope_cache_attention = fused_attention
        for module, function in available.items():
            module.available = function
    # the decode step took the fused kernel in every layer, given the whole rotary table (cos [32, 8])
    assert fused_calls == [torch.Size([32, args.head_dim // 2])] * args.n_layers, fused_calls
    error = relative_error(logits[True], logits[False])
    print(f"model decode step of {rows} rows with the kernels{' and experts' if experts else ''}: {error:.1e}")
    assert error < TOLERANCE


def check_push_all_reduce() -> None:
    """One rank of the push all-reduce, its W - 1 peers played by this process: their receive buffers are
    ordinary tensors, and their pushes into ours are written before the kernel runs. Over consecutive
    calls (all three phases, then the first again): rank 1's part reaches every buffer's slot 1 with -0.0
    sent as +0.0, the sum is the rank-order sum, our own slots are empty again, and untouched phases stay
    empty everywhere."""
    world, rank, capacity = 4, 1, 600
    for dtype in (torch.float32, torch.float16):  # (bfloat16: the interpreter rounds its casts differently)
        bits, empty = allreduce.bits_dtype(dtype), allreduce.sentinel(dtype)
        buffers = [torch.full((allreduce.buffer_elements(world, capacity),), empty, dtype=bits) for _ in range(world)]
        addresses = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
        counters = torch.zeros(3, dtype=torch.int32)
        run = allreduce.PushAllReduce(dtype, rank, world, capacity, addresses, counters, block=128)
        generator = torch.Generator().manual_seed(0)
        for call, numel in enumerate([capacity, 1, 257, 500]):
            phase = call % allreduce.PHASES
            slot = [phase * world * capacity + source * capacity for source in range(world)]
            parts = [torch.randn(numel, generator=generator).to(dtype) for _ in range(world)]
            parts[rank][::7] = -0.0
            for source in range(world):
                if source != rank:
                    buffers[rank][slot[source]:slot[source] + numel] = parts[source].view(bits)
            got = run(parts[rank])
            assert torch.equal(got, allreduce.reference_all_reduce(parts)), (dtype, call)
            assert (buffers[rank] == empty).all(), (dtype, call)
            sent = torch.where(parts[rank] == 0, 0.0, parts[rank]).to(dtype)  # +0.0 for -0.0
            for peer in range(world):
                if peer != rank:
                    received = buffers[peer][slot[rank]:slot[rank] + numel]
                    assert torch.equal(received, sent.view(bits)), (dtype, call, peer)
                    received.fill_(empty)  # the peer consumed it
                assert (buffers[peer] == empty).all(), (dtype, call, peer)
            assert counters.tolist() == [(call + 1) % allreduce.PHASES] * 3
    print("push all-reduce: sums, resets and phases")


def check_push_residual_norm() -> None:
    """The fused push all-reduce (PushAllReduce.residual_norm) on one rank, its peers played by this process
    as in check_push_all_reduce, in turn with the plain kernel on the same buffers and counters: h, the
    normed rows and the routing equal kernels.router's reference on the all-reduced sum; our part reaches
    the peers, our slots are empty again and the phases advance alike."""
    world, rank, capacity, dtype = 3, 2, 400, torch.float32
    bits, empty = allreduce.bits_dtype(dtype), allreduce.sentinel(dtype)
    buffers = [torch.full((allreduce.buffer_elements(world, capacity),), empty, dtype=bits) for _ in range(world)]
    addresses = torch.tensor([buffer.data_ptr() for buffer in buffers], dtype=torch.int64)
    counters = torch.zeros(3, dtype=torch.int32)  # 3 programs: 5 rows make programs loop
    run = allreduce.PushAllReduce(dtype, rank, world, capacity, addresses, counters, block=128)
    generator = torch.Generator().manual_seed(1)
    norm_weight = torch.rand(40, generator=generator) + 0.5
    gate = torch.randn(5, 40, generator=generator)
    for call, (rows, fused, route, split) in enumerate([(5, True, True, 0), (1, False, False, 0), (3, True, False, 0),
                                                        (5, True, True, 0), (2, False, False, 0), (3, True, False, 2),
                                                        (1, True, False, 3), (4, True, False, 1)]):
        phase = call % allreduce.PHASES
        numel = rows * 40
        slot = [phase * world * capacity + source * capacity for source in range(world)]
        parts = [torch.randn(rows, 40, generator=generator) for _ in range(world)]
        if split:  # our part as the experts' float32 partials [split, rows * 2, 40], summed as block_end does
            partials = torch.randn(split, rows * 2, 40, generator=generator)
            partials[:, :, ::9] = -0.0
            per_slot = partials[0].clone()
            for s in range(1, split):
                per_slot += partials[s]
            parts[rank] = torch.zeros(rows, 40) + per_slot.view(rows, 2, 40)[:, 0] + per_slot.view(rows, 2, 40)[:, 1]
        parts[rank][:, ::9] = -0.0
        for source in range(world):
            if source != rank:
                buffers[rank][slot[source]:slot[source] + numel] = parts[source].flatten().view(bits)
        if split:
            x = torch.randn(rows, 40, generator=generator)
            got = run.residual_norm_partials(partials, 2, x, norm_weight, 1e-5)
            expected = router.reference_residual_norm_route(x, allreduce.reference_all_reduce(parts), norm_weight,
                                                            1e-5, gate, 2)
            assert torch.equal(got[0], expected[0]), call
            assert torch.allclose(got[1], expected[1], rtol=1e-5, atol=1e-6), call
        elif fused:
            x = torch.randn(rows, 40, generator=generator)
            got = run.residual_norm(parts[rank], x, norm_weight, 1e-5, gate if route else None, 2)
            expected = router.reference_residual_norm_route(x, allreduce.reference_all_reduce(parts), norm_weight,
                                                            1e-5, gate, 2)
            for name, a, b in zip(("h", "normed", "weights", "ids"), got, expected, strict=False):
                assert a.shape == b.shape and a.dtype == b.dtype, (call, name)
                assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), (call, name)
        else:
            assert torch.equal(run(parts[rank]), allreduce.reference_all_reduce(parts)), call
        assert (buffers[rank] == empty).all(), call
        sent = torch.where(parts[rank] == 0, 0.0, parts[rank]).flatten()
        for peer in range(world):
            if peer != rank:
                received = buffers[peer][slot[rank]:slot[rank] + numel]
                assert torch.equal(received, sent.view(bits)), (call, peer)
                received.fill_(empty)
            assert (buffers[peer] == empty).all(), (call, peer)
        assert counters.tolist() == [(call + 1) % allreduce.PHASES] * 3
    print("push all-reduce with residual, norm and routing: sums, resets and phases")


def check_pdl_paths() -> None:
    """The decode kernels' PDL code (kernels.pdl: weights' first tile loaded before the wait, the loops
    starting after it; the wait, release and L2 prefetch themselves are GPU instructions, left out here)
    through the same checks, with PDL taken as active; the MoE then ends with the block-end kernel."""
    active = pdl.active
    pdl.active = lambda x: True
    try:
        gemv = dict(gemv_max_slots=1 << 30, gemv_block_d=64, gemv_down_block_i=64)
        check_moe("gemv with pdl", moe.MoEConfig(**gemv), [(3, 5, 3, 96, 200), (1, 8, 2, 64, 100)])
        check_moe("gemv pipelined with pdl", moe.MoEConfig(gemv_stages=3, **gemv), [(1, 8, 2, 96, 200)],
                  block=(4, 32))
        check_int8_linear()
        check_router()
        check_decode_attention()
        check_block_end()
        check_greedy_state()
        check_model_decode_step(rows=1, experts=True)  # the block ends in the MoE's kernels
    finally:
        pdl.active = active


def main() -> None:
    small_tiles = dict(grouped_block_m=32, grouped_block_n=32, grouped_block_k=32, grouped_down_block_n=32)
    prefill_shapes = [(3, 5, 3, 96, 200), (50, 8, 2, 64, 128)]
    check_moe("tiled", moe.MoEConfig(gemv_max_slots=0), [(17, 8, 2, 128, 96)])
    check_moe("grouped", moe.MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_int8_fp16=False, **small_tiles),
              prefill_shapes)
    check_moe("grouped swap_ab", moe.MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_swap_ab=True,
                                               **small_tiles), prefill_shapes)
    gemv = dict(gemv_max_slots=1 << 30, gemv_block_d=64, gemv_down_block_i=64)
    check_moe("gemv", moe.MoEConfig(**gemv), [(3, 5, 3, 96, 200)])
    check_moe("gemv persistent", moe.MoEConfig(gemv_programs=7, **gemv), [(3, 5, 3, 96, 200)])
    check_moe("gemv no magic", moe.MoEConfig(int8_magic=False, **gemv), [(1, 8, 2, 96, 64)])
    # w1 / w3 in blocks: tiles narrower than a block (grouped 32 of 64) and as wide (gemv 32, tiled 64)
    check_moe("tiled", moe.MoEConfig(gemv_max_slots=0), [(17, 8, 2, 128, 96)], block=(8, 64))
    check_moe("grouped", moe.MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_int8_fp16=False, **small_tiles),
              [(50, 8, 2, 64, 128)], block=(8, 64))
    check_moe("grouped swap_ab", moe.MoEConfig(gemv_max_slots=0, grouped_min_slots=0, grouped_swap_ab=True,
                                               **small_tiles), [(3, 5, 3, 96, 200)], block=(4, 32))
    check_moe("gemv", moe.MoEConfig(**gemv), [(3, 5, 3, 96, 200)], block=(4, 32))
    check_moe("gemv pipelined", moe.MoEConfig(gemv_stages=3, **gemv), [(3, 5, 3, 96, 200)], block=(4, 32))
    check_half2_gate_up()
    check_block_end()
    check_greedy_state()
    check_rows_to_fp16()
    check_grouped_int8_fp16()
    check_int8_linear()
    check_router()
    check_decode_attention()
    check_rope_rows()
    check_group_slots()
    check_model_decode_step()
    check_push_all_reduce()
    check_push_residual_norm()
    check_pdl_paths()
    print("all kernel checks passed")


if __name__ == "__main__":
    main()
