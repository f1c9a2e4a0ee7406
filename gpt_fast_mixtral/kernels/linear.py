"""Linear layers for decode: y = (x @ w.T) * scales for int8 w [N, K] and scales [N], y = x @ w.T for
16-bit (or float32) w.

A decode step reads every attention and output-head weight once for a handful of tokens, so these
layers are matrix-vector products bound by memory bandwidth. The kernel streams each weight row once,
dequantises int8 in registers (the conversion trick in kernels.moe.dequant) and applies the per-row
scale to the float32 sum. One token uses CUDA-core FMAs; 2 to 16 int8 tokens use one 16-row tensor-core
tile. 16-bit weights take the kernel for one token only (`linear`): cuBLAS is as fast there, but a
cuBLAS kernel cannot launch with PDL (kernels.pdl) and so breaks the decode step's chain twice a layer.
The attention's output projection (PRELOAD_CONFIG) holds its whole weight in registers before its PDL wait
and, for 16-bit x, multiplies it on int8 tensor cores with x as a 16-bit fixed-point number per slice of
columns (_preloaded_imma_kernel: the one approximation there, far below the result's own rounding).
`reference_int8_linear` is the plain PyTorch definition the int8 kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gpt_fast_mixtral.kernels import moe, pdl

triton = moe.triton
if triton is not None:
    import triton.language as tl

    from gpt_fast_mixtral.kernels.pdl import GPU_PTX, pdl_release, pdl_wait, prefetch_l2_rows

    dequant = moe.dequant
    # _preloaded_imma_kernel's largest fixed-point x: 127 * 256, so that its high int8 half stays in [-127, 127]
    FIXED_MAX = tl.constexpr(32512.0)


def available(x: Tensor) -> bool:
    return moe.available(x)


def reference_int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return (x.float() @ weight.float().T) * scales.float()


if triton is not None:

    @triton.jit
    def _weights(w, dtype: tl.constexpr, MAGIC: tl.constexpr, SCALED: tl.constexpr):
        """A loaded weight tile in `dtype`: int8 dequantised (SCALED, the scales applied later), else cast."""
        if SCALED:
            return dequant(w, dtype, MAGIC)
        return w.to(dtype)

    @triton.jit
    def _add_products(acc, w, x, DEFER: tl.constexpr):
        """acc plus a weight tile's products with x: DEFER, elementwise ([BLOCK_N, BLOCK_K], summed across
        threads after the loop); else summed per row now ([BLOCK_N])."""
        if DEFER:
            acc += w * x[None, :]
        else:
            acc += tl.sum(w * x[None, :], axis=1)
        return acc

    @triton.jit
    def _gemv_block(x_ptr, w_ptr, s_ptr, y_ptr, n_block, N, K, stride_wn, MAGIC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, DEFER: tl.constexpr,
                    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, SCALED: tl.constexpr = True,
                    PDL_TILES: tl.constexpr = 1):
        """y[rows of n_block] for one token: CUDA-core FMAs on weights converted in registers (SCALED: int8
        times s_ptr's per-row scales; else 16-bit or float32, s_ptr unused); STAGES as kernels.moe's
        matrix-vector loops. DEFER: each thread accumulates its own products across the loop ([BLOCK_N,
        BLOCK_K] float32) and the threads' sums meet once, after it; else every iteration sums its tile
        across threads. PDL (kernels.pdl): before waiting for the kernel that writes x, load the weight
        tile's first PDL_TILES * BLOCK_K columns into registers (and with PREFETCH ask L2 for the whole
        tile)."""
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        if SCALED:
            scales = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # in flight during the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K) if DEFER else (BLOCK_N,), dtype=tl.float32)
        start = 0
        if PDL:
            if PREFETCH:
                prefetch_l2_rows(w_ptr + offs_n.to(tl.int64) * stride_wn, mask_n, K, 16)
            first = ()
            for t in tl.static_range(PDL_TILES):
                offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
                first = first + (tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                                         other=0),)
            pdl_wait(PDL)
            for t in tl.static_range(PDL_TILES):
                offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                acc = _add_products(acc, _weights(first[t], tl.float32, MAGIC, SCALED), x, DEFER)
            start = PDL_TILES * BLOCK_K
        for k0 in tl.range(start, K, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            w = _weights(tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0),
                         tl.float32, MAGIC, SCALED)
            acc = _add_products(acc, w, x, DEFER)
        if DEFER:
            acc = tl.sum(acc, axis=1)
        if SCALED:
            acc = acc * scales
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       MAGIC: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PERSISTENT: tl.constexpr = False, STAGES: tl.constexpr = 1,
                       DEFER: tl.constexpr = False, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                       SCALED: tl.constexpr = True, PDL_TILES: tl.constexpr = 1):
        """One token (BLOCK_M 1): a program per BLOCK_N rows, or with PERSISTENT a 1-D grid of fewer programs
        looping over the row blocks. 2..16 tokens: one 16-row tensor-core tile per (rows, tokens) block.
        PDL: launched with programmatic dependent launch (kernels.pdl). SCALED: int8 weights with per-row
        scales; else weights of a float dtype and no scales."""
        pdl_release(PDL)
        if BLOCK_M != 1 or PERSISTENT:
            pdl_wait(PDL)
        if BLOCK_M == 1:
            if PERSISTENT:
                for n_block in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
                    _gemv_block(x_ptr, w_ptr, s_ptr, y_ptr, n_block, N, K, stride_wn, MAGIC, BLOCK_N, BLOCK_K,
                                STAGES, DEFER, SCALED=SCALED)
            else:
                _gemv_block(x_ptr, w_ptr, s_ptr, y_ptr, tl.program_id(0), N, K, stride_wn, MAGIC, BLOCK_N,
                            BLOCK_K, STAGES, DEFER, PDL, PREFETCH, SCALED, PDL_TILES)
        else:
            offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
            if SCALED:
                scales = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = _weights(tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0),
                             x.dtype, MAGIC, SCALED)
                if IEEE:
                    acc2 += tl.dot(x, tl.trans(w), input_precision="ieee")
                else:
                    acc2 += tl.dot(x, tl.trans(w))
            if SCALED:
                acc2 *= scales[None, :]
            tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                     acc2.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _preloaded_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, MAGIC: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr,
                               PDL: tl.constexpr = False):
        """One token and int8 weights: a program per BLOCK_N rows, holding their whole weight (CHUNKS tiles
        of BLOCK_K columns, CHUNKS * BLOCK_K >= K) in registers. With PDL every weight load is issued before
        the wait, so where the grid fits on the GPU at once the weight streams in while the kernel before
        runs (the decode attention) and after the wait only x is read."""
        pdl_release(PDL)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        tiles = ()
        for c in tl.static_range(CHUNKS):
            offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
            tiles = tiles + (tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :],
                                     other=0),)
        scales = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc += tl.sum(dequant(tiles[c], tl.float32, MAGIC) * x[None, :], axis=1)
        tl.store(y_ptr + offs_n, (acc * scales).to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _preload_slices(w_ptr, s_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr, PDL: tl.constexpr):
        """The tensor-core kernels' start: release the next kernel, load the program's BLOCK_N rows of the int8
        weight as CHUNKS tiles [SPLIT, BLOCK_N, BLOCK_K] (tile c: columns slice_start + c * BLOCK_K + [0,
        BLOCK_K) of each slice; zeros past K and for masked rows) and their scales, then wait. Returns (offs_n,
        mask_n, slice_start, tiles, scales)."""
        pdl_release(PDL)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        slice_start = tl.arange(0, SPLIT) * (CHUNKS * BLOCK_K)
        w_rows = w_ptr + offs_n[None, :, None].to(tl.int64) * stride_wn
        tiles = ()
        for c in tl.static_range(CHUNKS):
            offs_k = slice_start[:, None, None] + c * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
            tiles = tiles + (tl.load(w_rows + offs_k, mask=mask_n[None, :, None] & (offs_k < K), other=0),)
        scales = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        return offs_n, mask_n, slice_start, tiles, scales

    @triton.jit
    def _preloaded_mma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                              SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr,
                              PDL: tl.constexpr = False):
        """_preloaded_gemv_kernel on tensor cores, for 16-bit x: a program holds BLOCK_N (16, a tensor-core
        tile's rows) rows of the int8 weight, in SPLIT slices of CHUNKS * BLOCK_K columns (one warp each),
        all loaded before the PDL wait. After it, each chunk is converted to x's dtype (exact for int8) and
        multiplied by x broadcast to the 16 columns of a tensor-core tile (a batched dot over the slices:
        every column of the products holds the same sums, products exact, sums in float32); the slices'
        sums meet once, at the end. After the wait a thread runs about half the instructions of the
        CUDA-core kernel (Mixtral's wo: ~1,400 against ~2,600 SASS; the conversions stay, the products and
        the sums across threads go to the tensor cores), but each chunk's x passes through shared memory
        into the tensor cores' layout: fewer, longer chunks (LinearConfig.gemv_preload_mma_block_k)."""
        offs_n, mask_n, slice_start, tiles, scales = _preload_slices(w_ptr, s_ptr, N, K, stride_wn, BLOCK_N, SPLIT,
                                                                     BLOCK_K, CHUNKS, PDL)
        acc = tl.zeros((SPLIT, BLOCK_N, 16), dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            offs_k = slice_start[:, None] + c * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            acc = tl.dot(tiles[c].to(x.dtype), tl.broadcast_to(x[:, :, None], (SPLIT, BLOCK_K, 16)), acc)
        # the 16 columns are equal: their max is each one exactly (a sum of them would round)
        y = tl.sum(tl.max(acc, axis=2), axis=0)
        tl.store(y_ptr + offs_n, (y * scales).to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _kept_int8(v):
        """v (int8) as computed here, in the layout it was computed in (a no-op of inline PTX, which the compiler
        neither moves nor repeats). Without it Triton computes the values that feed a dot again in the tensor
        cores' operand layout, where each thread holds every value of x several times over (x's fixed-point
        split took 2,300 SASS instructions a thread instead of ~750)."""
        if GPU_PTX:
            v = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int8, is_pure=False, pack=4)
        return v

    @triton.jit
    def _preloaded_imma_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr,
                               SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr,
                               PDL: tl.constexpr = False):
        """_preloaded_mma_kernel on int8 tensor cores: the weight is multiplied as loaded, with no conversion.
        x (16-bit) becomes, per slice (a warp's columns), a 16-bit fixed-point number of step top / FIXED_MAX
        (top: the slice's largest |x|), split into two int8 halves (x ~ step * (256 hi + lo)); each chunk is
        two int8 products (hi and lo broadcast to the 16 columns of a tile) summed exactly in int32. The one
        approximation is x's rounding to its step: at most top / 65024 an element, against bfloat16's
        1 / 256 of each element's own size, so y's error stays far below the rounding of its 16-bit result
        unless a slice's largest |x| is thousands of times its typical one. A slice with a NaN or an infinity
        gives NaN rows. After the wait a thread runs ~750 SASS instructions against the bf16 products' ~1,400
        (Mixtral's wo, Triton 3.9's sm_90 build): the int8-to-bf16 conversions were 1,170 of those."""
        offs_n, mask_n, slice_start, tiles, scales = _preload_slices(w_ptr, s_ptr, N, K, stride_wn, BLOCK_N, SPLIT,
                                                                     BLOCK_K, CHUNKS, PDL)
        xs = ()
        top = tl.zeros((SPLIT,), dtype=tl.float32)
        for c in tl.static_range(CHUNKS):
            offs_k = slice_start[:, None] + c * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            top = _max_nan(top, tl.reduce(tl.abs(x), 1, _max_nan))
            xs = xs + (x,)
        finite = top < float("inf")  # False for NaN too
        top = tl.where(finite & (top > 0), top, 1.0)
        inv_step = FIXED_MAX / top
        acc_hi = tl.zeros((SPLIT, BLOCK_N, 16), dtype=tl.int32)
        acc_lo = tl.zeros((SPLIT, BLOCK_N, 16), dtype=tl.int32)
        for c in tl.static_range(CHUNKS):
            fixed = tl.floor(xs[c] * inv_step[:, None] + 0.5).to(tl.int32)  # |fixed| <= FIXED_MAX
            hi = (fixed + 128) >> 8  # in [-127, 127]
            lo = fixed - (hi << 8)  # in [-128, 127]
            hi = _kept_int8(hi.to(tl.int8))
            lo = _kept_int8(lo.to(tl.int8))
            acc_hi = tl.dot(tiles[c], tl.broadcast_to(hi[:, :, None], (SPLIT, BLOCK_K, 16)), acc_hi,
                            out_dtype=tl.int32)
            acc_lo = tl.dot(tiles[c], tl.broadcast_to(lo[:, :, None], (SPLIT, BLOCK_K, 16)), acc_lo,
                            out_dtype=tl.int32)
        # the 16 columns hold equal sums: their max is each one
        sums = tl.max(acc_hi, axis=2).to(tl.float32) * 256.0 + tl.max(acc_lo, axis=2).to(tl.float32)
        sums = tl.where(finite[:, None], sums * (top / FIXED_MAX)[:, None], float("nan"))
        y = tl.sum(sums, axis=0)
        tl.store(y_ptr + offs_n, (y * scales).to(y_ptr.dtype.element_ty), mask=mask_n)


@dataclass(frozen=True)
class LinearConfig:
    """Tiles for one token (CUDA-core FMAs) and for 2..16 tokens (one 16-row tensor-core tile)."""

    # Measured on an H200 with weights not in L2 (benchmarks/sweep_linear.py): wqkv 12.3 us, wo 8.2 us
    # (torch.compile's fused dequantise-and-reduce: 14.4, 9.6); 16 x 512 tiles took 17 us. Session 8, with
    # the prmt dequantisation (kernels.moe.int8_to_fp32; benchmarks/results/h200_sweep_session8.log):
    # 2 x 2048 tiles wqkv 10.5 / wo 7.9 / head 40.8 us against 12.0 / 8.4 / 40.8 for 4 x 1024.
    # A weight with fewer columns than gemv_block_k (a tensor-parallel shard: wo's K is 4096 / W) gets
    # narrower, taller tiles of the same size (`gemv_tile`): H200, Mixtral's wo over 8 ranks ([4096, 512])
    # 3.04 us in 8 x 512 tiles against 4.79 in 2 x 2048 ones, three quarters of which were masked off
    # (benchmarks/sweep_tp_shapes.py, session 10).
    gemv_block_n: int = 2
    gemv_block_k: int = 2048
    gemv_warps: int = 4
    # Loop iterations loaded ahead (see kernels.moe.MoEConfig.gemv_stages); 0: `gemv_plan` picks the tile and
    # stages by the weight's shape, a number (tests, sweeps) takes gemv_block_n x gemv_block_k with it.
    gemv_stages: int = 0
    # gemv_plan's pipelined tile, for weights with enough rows that it still makes gemv_pipeline_min_programs
    # programs. H200 (benchmarks/sweep_tp_shapes.py, session 10, results/h200_s10_sweep_tp_shapes_*.log):
    # 8 x 512 tiles 3 stages deep, wqkv [6144, 4096] 9.8 us against 10.9 (2 x 2048, unpipelined), wo
    # [4096, 4096] 7.7 against 8.0, over 2 ranks 6.7 / 5.1 against 6.9 / 5.5; but a wqkv shard over 4 ranks
    # ([1536, 4096], 192 programs) 5.7 against 5.2, over 8 (96 programs) 5.3 against 4.6.
    gemv_pipelined_block_n: int = 8
    gemv_pipelined_block_k: int = 512
    gemv_pipelined_stages: int = 3
    gemv_pipeline_min_programs: int = 256
    # Pipelined tiles sum their products across threads once, after the loop (_gemv_block's DEFER).
    # H200, 8 x 512 tiles 3 stages deep (session 13, results/h200_s13_linear_variants.log): wqkv 9.45
    # against 9.98 us, wo 7.65 / 8.08, over 2 ranks 6.56 / 6.94 and 5.04 / 5.39. Unpipelined tiles keep the
    # per-iteration sum: 2 x 2048 wqkv 11.57 with deferral against 10.86.
    gemv_pipelined_defer: bool = True
    # With PDL (kernels.pdl) a one-token program loads its first weight tile before its wait; True: it also
    # asks L2 for the whole tile. Off: every kernel of the chain releases the next first thing, so the
    # prefetches of several kernels land at once and crowd out the running one. H200, int8 Mixtral-8x7B
    # batch 1 (scripts/benchmark.py, session 15, one call): 260.3 tok/s without the prefetch, 253.9 with,
    # 247.5 / 249.6 without PDL (results/h200_s15_*).
    pdl_prefetch: bool = False
    # With PDL a one-token program loads its first gemv_pdl_tiles weight tiles into registers before its
    # wait (the kernel before it is still running), so after the wait the pipelined loop starts with that
    # much already in: the int8 wqkv and output head. H200, int8 Mixtral-8x7B batch 1, pure decode steps
    # replayed at position 105 (session 21, with the attention's early new-key loads; one call each):
    # 275.9 / 275.9 tok/s against 271.9 / 272.4 with 1 tile and the attention as before (the linears' median
    # critical-path share 9.3 -> 8.2 us); scripts/benchmark.py, nvidia-h200-x2, one call: 277.7 / 277.8
    # against 274.7 / 274.5. 3 tiles: no better (wqkv 8 x 512 tiles take 80 registers a thread with 2 or 3,
    # 72 with 1: 768 programs stay one wave). Down with 2 tiles (64 registers under maxnreg) lost: its
    # extra 8 MB of early loads slowed gate_up's tail (58.1 against 56.8 us), 275.8 / 277.6 against 279.0 /
    # 279.1 (benchmarks/NOTES.md, session 21).
    gemv_pdl_tiles: int = 2
    # > 0: a one-token int8 weight of at most gemv_preload_max_chunks * gemv_preload_block_k columns takes
    # _preloaded_gemv_kernel, gemv_preload_rows rows a program (gemv_preload_warps warps), each program's
    # whole weight loaded into registers before its PDL wait. 0: off (PRELOAD_CONFIG turns it on).
    gemv_preload_rows: int = 0
    gemv_preload_warps: int = 1
    gemv_preload_block_k: int = 1024
    gemv_preload_max_chunks: int = 4
    # True: with 16-bit activations the preloading kernel runs on tensor cores (_preloaded_mma_kernel): 16
    # rows a program, one warp per slice of at most gemv_preload_mma_slice columns (16 KB of int8 a warp,
    # as the CUDA-core kernel's 4 x 4096), in chunks of gemv_preload_mma_block_k. Float32 activations keep
    # the CUDA-core kernel. Measured in PRELOAD_CONFIG's comment.
    gemv_preload_mma: bool = False
    gemv_preload_mma_block_k: int = 256
    gemv_preload_mma_slice: int = 1024
    # True (with gemv_preload_mma): the products on int8 tensor cores, x as a 16-bit fixed-point number in two
    # int8 halves (_preloaded_imma_kernel), which needs no conversion of the weight. Measured in
    # PRELOAD_CONFIG's comment.
    gemv_preload_imma: bool = False
    tile_block_n: int = 32
    tile_block_k: int = 256
    tile_warps: int = 4
    tile_stages: int = 3
    int8_magic: bool = True
    # > 0: one token runs this many programs, each looping over row blocks (a persistent grid, e.g. a
    # multiple of the SM count); 0: one program per row block. Slower on an H200 (output head 50-69 us vs
    # 43, benchmarks/results/h200_sweep_decode_persistent_session4.log).
    gemv_programs: int = 0
    # Up to this many tokens the kernel runs (weights read once); more is prefill, which dequantises
    # the weight and calls cuBLAS.
    max_tokens: int = 16


DEFAULT_CONFIG = LinearConfig()
# 16-bit weights (`linear`): 4 x 1024 tiles two stages deep for weights of 4096 rows or more, else 2 x 2048
# unpipelined. H200, bf16, weights not in L2, launched with PDL back to back (benchmarks/sweep_tp_shapes.py
# --parts linear --precisions bf16, session 16, results/h200_s16_sweep_linear_bf16*.log), us:
#                    wqkv W=1   wo W=1   head   wqkv W=2 / 4 / 8    wo W=2 / 4 / 8
#   4 x 1024, 2 st     12.8      8.3     61.2     7.5 / 5.2 / 4.0    4.3 / 3.1 / 2.3
#   2 x 2048           13.4      9.8     60.5     7.0 / 4.4 / 3.3    5.6 / 3.1 / 2.2
#   cuBLAS             16.7     12.6     64.2    11.0 / 7.7 / 6.7    7.2 / 5.3 / 4.2
HALF_CONFIG = LinearConfig(gemv_block_n=2, gemv_block_k=2048, gemv_pipelined_block_n=4, gemv_pipelined_block_k=1024,
                           gemv_pipelined_stages=2, gemv_pipeline_min_programs=1024,
                           gemv_pdl_tiles=1)  # 2 not measured for 16-bit weights


# The attention's output projection (quantize.WeightOnlyInt8Linear.preload): a whole weight fits in the
# GPU's registers at once (Mixtral's wo, 16.8 MB: 4-row programs of one warp, 168 registers a thread with
# Triton 3.6, 12 per SM: 6336 rows on 132 SMs), so with PDL it streams in while the nearly idle decode
# attention runs (which lets its programs in once it has attended to its first tile of cached keys:
# attention.rope_cache_attention's release_after_first_tile; session 18 let them in right after its
# wait). H200, int8 wo [4096, 4096] behind 8 programs spinning 4.6 us, 32 in a CUDA graph
# (session 18, results/h200_s18_preload_micro.log): 9.74 us a pair against 12.20 for the default plan (2
# rows: 10.27, 1 row: 11.41). It does not pay where the kernel before is short: wqkv [6144, 4096] behind a
# 2.1 us kernel 12.70 against 10.89. End to end the weight's loads then slow the attention down (its
# critical-path share 4.4 -> 8.0 us against wo's 8.6 -> 4.0), so the step gains little: int8 Mixtral-8x7B
# batch 1, one H200, three calls 254.3 / 259.7 / 256.1 + 254.5 tok/s against 251.5 + 251.7 / 256.8 / 254.3
# + 254.1 without (scripts/benchmark.py --no-wo-preload); tp2 391.2 against 391.0 (results/*_s18*). With
# the attention's later release (session 19, one call): 268.6 against 264.9 without the preload.
# On tensor cores (gemv_preload_mma, session 39): H200, int8 Mixtral-8x7B batch 1 (scripts/benchmark.py,
# alternating processes, benchmarks/results/h200_s39_wo_mma.log): an uncapped board 281.1 / 281.6 tok/s
# against 278.1 / 278.7 on CUDA cores; a capped one (three rounds) medians 267.3 / 267.3 / 267.4 with
# 256-column chunks, 266.8 / 266.7 / 268.3 with 512, against 265.3 / 264.5 / 265.8. 128-column chunks were
# no better than CUDA cores, 1024 (64 KB of shared memory a program, which slowed gate_up) 5% worse.
# On int8 tensor cores (gemv_preload_imma, session 41: no conversion of the weight after the wait, ~750 SASS
# instructions a thread there against ~1,400): an uncapped H200 286.2 / 285.7 tok/s against 283.1 / 282.9 on
# bf16 tensor cores, alternating processes in one call (benchmarks/results/h200_s41_wo_imma.log).
PRELOAD_CONFIG = LinearConfig(gemv_preload_rows=4, gemv_preload_warps=1, gemv_preload_mma=True, gemv_preload_imma=True)


def gemv_tile(k: int, config: LinearConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """(rows, columns) of one program's weight tile for one token and K columns: config's tile, or for K
    below its width the narrowest power of two that covers K, with the rows scaled up to keep its size."""
    block_k = min(config.gemv_block_k, 1 << max(k - 1, 0).bit_length())
    return config.gemv_block_n * config.gemv_block_k // block_k, block_k


def gemv_plan(n: int, k: int, config: LinearConfig = DEFAULT_CONFIG) -> tuple[int, int, int]:
    """(rows, columns, stages) of one program's tile for one token and an [n, k] weight (see
    LinearConfig.gemv_stages)."""
    c = config
    if c.gemv_stages:
        return *gemv_tile(k, c), c.gemv_stages
    if k >= c.gemv_pipelined_block_k and n >= c.gemv_pipeline_min_programs * c.gemv_pipelined_block_n:
        return c.gemv_pipelined_block_n, c.gemv_pipelined_block_k, c.gemv_pipelined_stages
    return *gemv_tile(k, c), 1


def preloaded(k: int, scaled: bool, config: LinearConfig = DEFAULT_CONFIG) -> bool:
    """Whether one token and a weight of k columns take the whole-row preloading kernel
    (LinearConfig.gemv_preload_rows): int8 weights only."""
    c = config
    return scaled and c.gemv_preload_rows > 0 and k <= c.gemv_preload_block_k * c.gemv_preload_max_chunks


# Rows of a tensor-core program (_preloaded_mma_kernel): the 16 of one tile.
MMA_ROWS = 16


def preload_mma_plan(k: int, config: LinearConfig = DEFAULT_CONFIG) -> tuple[int, int, int]:
    """(slices = warps, chunk columns, chunks a slice) of _preloaded_mma_kernel for k columns: the fewest
    slices (a power of two) of at most gemv_preload_mma_slice columns each."""
    c = config
    split = triton.next_power_of_2(triton.cdiv(k, c.gemv_preload_mma_slice))
    return split, c.gemv_preload_mma_block_k, triton.cdiv(triton.cdiv(k, split), c.gemv_preload_mma_block_k)


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor, config: LinearConfig = DEFAULT_CONFIG) -> Tensor:
    """(x @ weight.T) * scales in x's dtype for x [..., K] with at most config.max_tokens rows."""
    if pdl.compiled_launch(x):
        return torch.ops.gpt_fast_mixtral.linear(x, weight, scales, pdl.config_values(config))
    return _linear(x, weight, scales, config)


def linear(x: Tensor, weight: Tensor, config: LinearConfig | None = None) -> Tensor:
    """x @ weight.T in x's dtype for one token (x [..., K] of K elements) and a weight [N, K] of x's dtype,
    contiguous; config: HALF_CONFIG for 16-bit weights, DEFAULT_CONFIG's tiles for float32."""
    if x.numel() != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(f"the float-weight kernel takes one token of the weight's dtype (more take cuBLAS), got x "
                         f"{x.dtype} {tuple(x.shape)} and weight {weight.dtype}")
    if config is None:
        config = HALF_CONFIG if weight.element_size() == 2 else DEFAULT_CONFIG
    if pdl.compiled_launch(x):
        return torch.ops.gpt_fast_mixtral.linear(x, weight, None, pdl.config_values(config))
    return _linear(x, weight, None, config)


def _linear(x: Tensor, weight: Tensor, scales: Tensor | None, config: LinearConfig) -> Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, (n, k) = x2.shape[0], weight.shape
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    c = config
    use_pdl = pdl.active(x)
    if rows == 1 and preloaded(k, scales is not None, c):
        if c.gemv_preload_mma and x.element_size() == 2:  # 16-bit x: on tensor cores
            split, block_k, chunks = preload_mma_plan(k, c)
            kernel = _preloaded_imma_kernel if c.gemv_preload_imma else _preloaded_mma_kernel
            kernel[(triton.cdiv(n, MMA_ROWS),)](
                x2, weight, scales, y, n, k, weight.stride(0), BLOCK_N=MMA_ROWS, SPLIT=split, BLOCK_K=block_k,
                CHUNKS=chunks, PDL=use_pdl, num_warps=split, num_stages=1, **pdl.launch_options(use_pdl))
        else:
            block_n = c.gemv_preload_rows
            _preloaded_gemv_kernel[(triton.cdiv(n, block_n),)](
                x2, weight, scales, y, n, k, weight.stride(0), MAGIC=c.int8_magic, BLOCK_N=block_n,
                BLOCK_K=c.gemv_preload_block_k, CHUNKS=triton.cdiv(k, c.gemv_preload_block_k), PDL=use_pdl,
                num_warps=c.gemv_preload_warps, num_stages=1, **pdl.launch_options(use_pdl))
        return y.view(*shape[:-1], n)
    persistent = False
    loop_stages = 1
    defer = False
    if rows == 1:
        block_m, warps, stages = 1, c.gemv_warps, 1
        block_n, block_k, loop_stages = gemv_plan(n, k, c)
        defer = loop_stages > 1 and c.gemv_pipelined_defer
        persistent = c.gemv_programs > 0
    else:
        block_m, block_n, block_k, warps, stages = 16, c.tile_block_n, c.tile_block_k, c.tile_warps, c.tile_stages
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, block_m))
    if persistent:
        grid = (min(grid[0], c.gemv_programs), 1)
    _linear_kernel[grid](x2, weight, scales, y, rows, n, k, x2.stride(0), weight.stride(0), y.stride(0),
                         MAGIC=c.int8_magic, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, PERSISTENT=persistent, STAGES=loop_stages, DEFER=defer, PDL=use_pdl,
                         PREFETCH=c.pdl_prefetch, SCALED=scales is not None, PDL_TILES=c.gemv_pdl_tiles,
                         num_warps=warps, num_stages=stages,
                         **pdl.launch_options(use_pdl))
    return y.view(*shape[:-1], n)


@torch.library.custom_op("gpt_fast_mixtral::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, scales: Tensor | None, config: list[int]) -> Tensor:
    return _linear(x, weight, scales, pdl.config_from_values(LinearConfig, config))


@_linear_op.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor | None, config: list[int]) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


if triton is not None:

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, out_ptr, n, k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < n) & (cols[None, :] < k)
        offsets = rows[:, None].to(tl.int64) * k + cols[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0).to(tl.float32)
        scale = tl.load(s_ptr + rows, mask=rows < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (w * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(weight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """weight [N, K] (int8, contiguous) * scales [N], rounded once to `dtype`."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if out.numel():
        _dequantize_kernel[(triton.cdiv(n, 8), triton.cdiv(k, 1024))](weight, scales, out, n, k, BLOCK_N=8,
                                                                      BLOCK_K=1024, num_warps=4)
    return out
