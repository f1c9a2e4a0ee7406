"""Decode attention that reads only the filled part of the static KV cache, in one kernel.

A CUDA-graph decode step has static shapes, so SDPA over the cache reads all max_seq_len slots of every
layer on every step (at 8k slots, 35 MB per layer for Mixtral: more than its attention weights). This
kernel takes each row's length from a device tensor instead: programs over (row, kv head, chunk of the
sequence) stop at the row's length (and start at its sliding window). A short row is one chunk, whose
program writes the output; a long one is cut into chunks whose partial softmaxes (max, sum, weighted
values) the last program to finish combines. `rope_cache_attention` also rotates q and k and writes the
new key and value into the cache, so a decode step's attention between its two projections is this one
kernel (it was five: two rotary, one cache write, attention, combine).
`reference_decode_attention` is the plain PyTorch definition it is tested against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt_fast_mixtral.kernels import moe, pdl

triton = moe.triton
if triton is not None:
    import triton.language as tl

    from gpt_fast_mixtral.kernels.pdl import pdl_release, pdl_wait, prefetch_l2_rows


def available(x: Tensor) -> bool:
    return moe.available(x)


def reference_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                               window: int | None = None) -> Tensor:
    """q [B, Hq, D] attends to positions [max(0, L - window), L) of k/v_cache [B, Hkv, S, D]; float32."""
    batch, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[1]
    out = torch.empty(batch, n_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(lengths[b])
        start = max(0, length - window) if window else 0
        keys = k_cache[b, :, start:length].float().repeat_interleave(group, dim=0)
        values = v_cache[b, :, start:length].float().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hsd->hs", q[b].float(), keys) / math.sqrt(head_dim)
        out[b] = torch.einsum("hs,hsd->hd", scores.softmax(-1), values)
    return out


if triton is not None:

    @triton.jit
    def _rotate(x1, x2, cos, sin):
        """The rotated halves of a head (half-split layout), in float32."""
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def _kv_tile(k_ptr, v_ptr, kv_base, s0, hi, stride_ks, offs_h, mask_h, half, BLOCK_S: tl.constexpr):
        """Cached keys and values of slots [s0, min(s0 + BLOCK_S, hi)) of one kv head, as two halves each
        [BLOCK_S, BLOCK_HALF] (zeros past hi), and the slots' mask."""
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < hi
        kv_offsets = kv_base + offs_s[:, None].to(tl.int64) * stride_ks + offs_h[None, :]
        kv_mask = mask_s[:, None] & mask_h[None, :]
        k1 = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        k2 = tl.load(k_ptr + kv_offsets + half, mask=kv_mask, other=0.0)
        v1 = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v2 = tl.load(v_ptr + kv_offsets + half, mask=kv_mask, other=0.0)
        return k1, k2, v1, v2, mask_s

    @triton.jit
    def _attend_tile(q1, q2, k1, k2, v1, v2, mask_s, m, denom, acc1, acc2, SCALE: tl.constexpr,
                     PRECISION: tl.constexpr):
        """The online softmax's step over one tile with at least one slot in mask_s: the running max m,
        sum denom and weighted values acc1 / acc2 (two halves) of the query rows, updated."""
        scores = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        scores = tl.dot(q2, tl.trans(k2), scores, input_precision=PRECISION) * SCALE
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=PRECISION)
        return m_new, denom, acc1, acc2

    @triton.jit
    def _attend_one(q1, q2, k1, k2, v1, v2, m, denom, acc1, acc2, SCALE: tl.constexpr):
        """_attend_tile's step for one slot whose key and value halves k1, k2, v1, v2 [BLOCK_HALF] are in
        registers (the new position's, in the caches' dtype), with float32 products."""
        score = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
                 + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * SCALE
        m_new = tl.maximum(m, score)
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        denom = denom * alpha + p
        p = p.to(v1.dtype).to(tl.float32)[:, None]  # rounded as the tiles' products take it
        acc1 = acc1 * alpha[:, None] + p * v1.to(tl.float32)[None, :]
        acc2 = acc2 * alpha[:, None] + p * v2.to(tl.float32)[None, :]
        return m_new, denom, acc1, acc2

    @triton.jit
    def _decode_attention_kernel(
            q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, cos_ptr, sin_ptr,
            window, head_dim, stride_qb, stride_qh, stride_len, stride_kb, stride_kh, stride_ks, stride_ob,
            stride_oh, stride_pb, stride_ph, stride_count, stride_cos_p, stride_cos_d, stride_sin_p, stride_sin_d,
            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr,
            SPLITS: tl.constexpr, BLOCK_GC: tl.constexpr, COMBINE: tl.constexpr, MIN_CHUNK: tl.constexpr,
            SINGLE_SPAN: tl.constexpr,
            SCALE: tl.constexpr, PRECISION: tl.constexpr,
            ROPE: tl.constexpr, PDL: tl.constexpr = False, RELEASE_AFTER_FIRST_TILE: tl.constexpr = False,
            PREFETCH: tl.constexpr = False):
        """Program (row b, kv head, split): the GROUP query heads sharing the kv head attend to one chunk
        of the row's filled slots [start, length). The chunk length is chosen per row from its length
        (>= MIN_CHUNK, at most SPLITS chunks; a row of at most SINGLE_SPAN slots is one chunk), so a short
        row runs one program per kv head and writes its output directly; otherwise every chunk writes a
        partial softmax (max, sum, weighted values) and the last to finish (a per-(row, kv head) counter in
        count_ptr, left at 0) combines them.

        Heads are handled as two halves of BLOCK_HALF columns (the rotary embedding's half-split layout).
        ROPE: q_ptr holds each row's qkv projection ([Hq + 2 Hkv] heads of head_dim); the query heads are
        rotated here (cos / sin: the rotary tables [positions, head_dim / 2], read at the row's position),
        and the chunk holding the row's new position (len_ptr holds positions: length = position + 1)
        writes the rotated key and the value into the caches and attends to them from registers. With
        PDL, each program issues the loads of its first tile of cached keys and values (and of the rotary
        rows) before it waits for the projection: they come from earlier steps, not from that kernel.
        Otherwise q_ptr holds the rotated queries [B, Hq, head_dim] and len_ptr the lengths, and the
        program waits first.
        PREFETCH (with ROPE and PDL): before the wait, the program also asks L2 for the rest of its chunk's
        cached keys and values, which the loop after the first tile would otherwise fetch from memory one tile
        ahead.
        PDL: launched with programmatic dependent launch (kernels.pdl); RELEASE_AFTER_FIRST_TILE: the next
        kernel (the output projection) is let in only once this program has attended to its first tile of
        cached keys, not first thing: that kernel issues its whole weight's loads before its own wait
        (kernels.linear's preloading kernel), and they would otherwise compete with the qkv projection still
        running and queue ahead of this kernel's loads. H200, int8 Mixtral-8x7B batch 1, one call: 268.8 /
        268.3 tok/s against 263.7 / 263.1 releasing right after the wait (session 18's choice) and 258.9
        after the whole loop; 264.9 with wo not preloaded (benchmarks/NOTES.md, session 19). Loading the
        first tile before the wait: 267.7 against 265.9 tok/s (means of three alternating pairs, one call;
        session 20)."""
        if not RELEASE_AFTER_FIRST_TILE:
            pdl_release(PDL)
        if not ROPE:  # the caches may have been written by the previous kernel
            pdl_wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        n_kv_heads = tl.num_programs(1)
        length = tl.load(len_ptr + b * stride_len).to(tl.int32)
        if ROPE:
            length += 1
        start = 0
        if window > 0:
            start = tl.maximum(length - window, 0)
        span = length - start
        chunk = tl.maximum(tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_S) * BLOCK_S, MIN_CHUNK)
        chunk = tl.where(span <= SINGLE_SPAN, tl.maximum(chunk, SINGLE_SPAN), chunk)
        active = tl.cdiv(span, chunk)
        if split < active:
            half = head_dim // 2
            offs_g = tl.arange(0, BLOCK_G)
            mask_g = offs_g < GROUP
            heads = kv_head * GROUP + offs_g
            offs_h = tl.arange(0, BLOCK_HALF)
            mask_h = offs_h < half
            kv_base = b * stride_kb + kv_head.to(tl.int64) * stride_kh
            lo = start + split * chunk
            hi = tl.minimum(lo + chunk, length)
            # ROPE: the chunk ending at the new position reads the cache up to it and takes the new key and
            # value from the projection (in registers: nothing waits for their write to the cache).
            cached_hi = hi
            if ROPE:
                cached_hi = tl.where(split == active - 1, hi - 1, hi)
            k1, k2, v1, v2, mask_s = _kv_tile(k_ptr, v_ptr, kv_base, lo, cached_hi, stride_ks, offs_h, mask_h, half,
                                              BLOCK_S)
            if ROPE:
                position = (length - 1).to(tl.int64)
                cos = tl.load(cos_ptr + position * stride_cos_p + offs_h * stride_cos_d, mask=mask_h, other=0.0)
                sin = tl.load(sin_ptr + position * stride_sin_p + offs_h * stride_sin_d, mask=mask_h, other=0.0)
                cos, sin = cos.to(tl.float32), sin.to(tl.float32)
                if PREFETCH:  # slots [lo + BLOCK_S, cached_hi) of this kv head: one contiguous range each
                    rest = kv_base + (lo + BLOCK_S).to(tl.int64) * stride_ks + tl.zeros((1,), dtype=tl.int64)
                    rest_bytes = (cached_hi - lo - BLOCK_S) * stride_ks * k_ptr.dtype.element_ty.primitive_bitwidth // 8
                    prefetch_l2_rows(k_ptr + rest, rest >= 0, rest_bytes, 128)
                    prefetch_l2_rows(v_ptr + rest, rest >= 0, rest_bytes, 128)
                # Only now the projection's output is needed. The cached slots read above come from earlier
                # steps: some kernel in between waits before letting its successor in (the MoE's gate_up
                # does), so those steps' writes are complete.
                pdl_wait(PDL)
            q_mask = mask_g[:, None] & mask_h[None, :]
            q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_h[None, :]
            q1 = tl.load(q_rows, mask=q_mask, other=0.0)
            q2 = tl.load(q_rows + half, mask=q_mask, other=0.0)
            if ROPE:
                # The new position's key and value (the chunk ending at it uses them after its loop) are
                # loaded with the queries: one round trip to L2 after the wait, not two.
                row = q_ptr + b * stride_qb + (n_kv_heads * GROUP + kv_head) * stride_qh
                value = row + n_kv_heads * stride_qh
                new_mask = offs_h < tl.where(cached_hi < hi, half, 0)
                new_k1 = tl.load(row + offs_h, mask=new_mask, other=0.0)
                new_k2 = tl.load(row + half + offs_h, mask=new_mask, other=0.0)
                new_v1 = tl.load(value + offs_h, mask=new_mask, other=0.0)
                new_v2 = tl.load(value + half + offs_h, mask=new_mask, other=0.0)
                r1, r2 = _rotate(q1, q2, cos[None, :], sin[None, :])
                q1, q2 = r1.to(q1.dtype), r2.to(q1.dtype)
            m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
            denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_G, BLOCK_HALF), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_G, BLOCK_HALF), dtype=tl.float32)
            if lo < cached_hi:
                m, denom, acc1, acc2 = _attend_tile(q1, q2, k1, k2, v1, v2, mask_s, m, denom, acc1, acc2, SCALE,
                                                    PRECISION)
            if RELEASE_AFTER_FIRST_TILE:  # the first keys are in: let the next kernel load
                pdl_release(PDL)
            for s0 in range(lo + BLOCK_S, cached_hi, BLOCK_S):
                k1, k2, v1, v2, mask_s = _kv_tile(k_ptr, v_ptr, kv_base, s0, cached_hi, stride_ks, offs_h, mask_h,
                                                  half, BLOCK_S)
                m, denom, acc1, acc2 = _attend_tile(q1, q2, k1, k2, v1, v2, mask_s, m, denom, acc1, acc2, SCALE,
                                                    PRECISION)
            if ROPE and cached_hi < hi:  # this chunk ends at the new position
                kn1, kn2 = _rotate(new_k1, new_k2, cos, sin)
                kn1, kn2 = kn1.to(k_ptr.dtype.element_ty), kn2.to(k_ptr.dtype.element_ty)
                vn1, vn2 = new_v1.to(v_ptr.dtype.element_ty), new_v2.to(v_ptr.dtype.element_ty)
                slot = kv_base + (length - 1).to(tl.int64) * stride_ks + offs_h
                tl.store(k_ptr + slot, kn1, mask=mask_h)
                tl.store(k_ptr + slot + half, kn2, mask=mask_h)
                tl.store(v_ptr + slot, vn1, mask=mask_h)
                tl.store(v_ptr + slot + half, vn2, mask=mask_h)
                m, denom, acc1, acc2 = _attend_one(q1, q2, kn1, kn2, vn1, vn2, m, denom, acc1, acc2, SCALE)
            out_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_h[None, :]
            if active == 1:
                tl.store(out_rows, (acc1 / denom[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
                tl.store(out_rows + half, (acc2 / denom[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
            else:
                first = b * stride_pb + kv_head * GROUP * stride_ph  # the group's first head, chunk 0
                partial = first + offs_g * stride_ph + split
                tl.store(m_ptr + partial, m, mask=mask_g)
                tl.store(l_ptr + partial, denom, mask=mask_g)
                acc_rows = acc_ptr + partial[:, None] * (2 * BLOCK_HALF) + offs_h[None, :]
                tl.store(acc_rows, acc1, mask=mask_g[:, None])
                tl.store(acc_rows + BLOCK_HALF, acc2, mask=mask_g[:, None])
                # Every thread's partial is written before the counter moves (the release orders them for
                # the program that reads them after its acquire).
                tl.debug_barrier()
                counter = count_ptr + b * stride_count + kv_head
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == active - 1:
                    tl.store(counter, 0)  # ready for the next call
                    _combine(m_ptr + first, l_ptr + first, acc_ptr + first * (2 * BLOCK_HALF),
                             out_ptr + b * stride_ob + kv_head * GROUP * stride_oh, active, half, stride_ph,
                             stride_oh, GROUP, BLOCK_GC, BLOCK_HALF, COMBINE)

    @triton.jit
    def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, active, half, stride_ph, stride_oh, GROUP: tl.constexpr,
                 BLOCK_GC: tl.constexpr, BLOCK_HALF: tl.constexpr, CHUNK: tl.constexpr):
        """Merge the `active` partial softmaxes of each of the GROUP query heads (pointers at the group's
        first head) into out. The partials are read from L2 (".cg"): other programs wrote them during
        this kernel. The partials of CHUNK chunks of every head (BLOCK_GC >= GROUP) are loaded together
        and merged online: `active` <= CHUNK takes one round trip to L2. A loop over the heads that
        stored each head's output before loading the next head's partials made ~8 dependent round trips
        (H200, Mixtral-8x7B: the attention's critical path at positions 300-1000 was 24 us a layer, 15 with
        this and the same chunks; benchmarks/NOTES.md, session 29)."""
        offs_g = tl.arange(0, BLOCK_GC)
        mask_g = offs_g < GROUP
        offs_h = tl.arange(0, BLOCK_HALF)
        best = tl.full((BLOCK_GC,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_GC,), dtype=tl.float32)
        out1 = tl.zeros((BLOCK_GC, BLOCK_HALF), dtype=tl.float32)
        out2 = tl.zeros((BLOCK_GC, BLOCK_HALF), dtype=tl.float32)
        for s0 in range(0, active, CHUNK):
            offs_s = s0 + tl.arange(0, CHUNK)
            mask = mask_g[:, None] & (offs_s < active)[None, :]
            rows = offs_g[:, None] * stride_ph + offs_s[None, :]  # [GC, CHUNK] partial indices
            m = tl.load(m_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
            denom = tl.load(l_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")
            acc_rows = acc_ptr + rows[:, :, None] * (2 * BLOCK_HALF) + offs_h[None, None, :]
            acc1 = tl.load(acc_rows, mask=mask[:, :, None], other=0.0, cache_modifier=".cg")
            acc2 = tl.load(acc_rows + BLOCK_HALF, mask=mask[:, :, None], other=0.0, cache_modifier=".cg")
            new_best = tl.maximum(best, tl.max(m, axis=1))
            new_best = tl.where(mask_g, new_best, 0.0)  # padding heads: no NaN from -inf - -inf
            alpha = tl.exp(best - new_best)
            weight = tl.where(mask, tl.exp(m - new_best[:, None]), 0.0)
            total = total * alpha + tl.sum(denom * weight, axis=1)
            out1 = out1 * alpha[:, None] + tl.sum(acc1 * weight[:, :, None], axis=1)
            out2 = out2 * alpha[:, None] + tl.sum(acc2 * weight[:, :, None], axis=1)
            best = new_best
        total = tl.where(mask_g, total, 1.0)
        out_rows = out_ptr + offs_g[:, None] * stride_oh + offs_h[None, :]
        out_mask = mask_g[:, None] & (offs_h < half)[None, :]
        tl.store(out_rows, (out1 / total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(out_rows + half, (out2 / total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


# How a row's filled slots are cut into chunks, one program each (per kv head): chunks of at least MIN_CHUNK
# slots, at most TARGET_PROGRAMS / Hkv of them. One 64-slot tile after the first adds ~2.3 us to a program and
# one combining step over 16 chunks ~2 us. 128 / 256 was fastest or within 1% at every position tried but
# 300-1000, where 64 / 512 was 1-1.5% faster (and 1.3% slower at 105, 4-6% at 4000-8000). H200,
# int8 Mixtral-8x7B, pure decode step (tok/s at positions 105 / 300 / 1000 / 4000 / 8000): 274.9 / 266.7 /
# 264.9 / 259.9 / 247.3 (the last by its chunks: 32 of 256, as 256 / 512 gives); 256 / 512: 275.2 / 256.3 /
# 256.1 / 252.4 / 247.3; 64 / 512: 271.3 / 269.9 / 268.6 / 245.2 / 237.3; before the combine took all heads'
# partials at once (256 / 512): 279.0 / 239.3 / 239.6 / 238.3 / 235.2 (benchmarks/NOTES.md, session 29).
MIN_CHUNK = 128
TARGET_PROGRAMS = 256
# A row of at most SINGLE_SPAN slots is one chunk whatever MIN_CHUNK says: the last chunk's ticket and the
# combine cost more than a third 64-slot tile (H200, int8 Mixtral-8x7B, pure decode step at positions 150 /
# 180 / 200: 273.8 / 272.9 / 270.3 tok/s against 270.0 / 269.9 / 269.9 for two 128-slot chunks; 256 slots
# 273.2 / 272.8 / 268.8; the benchmark's 200-token decode 277.8 / 277.6 against 275.8 / 276.5, one call,
# benchmarks/NOTES.md, session 30).
SINGLE_SPAN = 192

# Chunks' partials the combining program loads at once (_combine): 16 chunks of 4 heads of 128 take 64 registers a
# thread at 4 warps, less than the attention before it.
COMBINE_SPLITS = 16

# rope_cache_attention's programs ask L2 for their chunk's cached keys and values past the first tile before
# they wait (_decode_attention_kernel's PREFETCH; False: the comparison's baseline). H200, Mixtral-8x7B's decode
# attention alone, 32 layers chained in a CUDA graph (session 40, benchmarks/results/attention_micro_session40.py):
# 5.09 / 5.13 us a call at positions 150 / 190 (three tiles) against 6.01 / 6.15, 6.00 against 6.33 at 200 (two
# chunks), 6.11 / 6.42 against 6.60 / 6.79 at 500 / 1000, the same at one or two tiles. Loading the tiles three
# stages ahead instead: 5.44 / 5.46 at 150 / 190, no better elsewhere. Only with PDL, where the kernel is launched
# by its custom op: traced by torch.compile (the step without PDL), the prefetch's inline PTX (not pure) makes
# torch's analysis of which arguments a user kernel writes give up and treat every tensor argument as written,
# cos and sin too, two views of one table; that step then hit an illegal address in tests/test_gpu.py's float32
# tiny model, at positions where the prefetch loop never ran (eager launches without PDL passed; session 40).
PREFETCH_CHUNK = True


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, window: int | None, n_heads: int,
            head_dim: int, counters: Tensor | None, rope: tuple[Tensor, Tensor] | None, block_s: int,
            target_programs: int, min_chunk: int, single_span: int, release_after_first_tile: bool = False) -> Tensor:
    batch = q.shape[0]
    n_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if n_heads % n_kv_heads or head_dim % 2:
        raise ValueError(f"{n_heads} query heads over {n_kv_heads} kv heads of head_dim {head_dim}: the query "
                         "heads must be a multiple of the kv heads and head_dim even")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need contiguous head_dim, and k and v caches one layout")
    group = n_heads // n_kv_heads
    # Enough chunks to fill the GPU at the longest length for one row (a power of two: the combine
    # reads them as one block). Not a function of the batch size: a compiled step with a dynamic batch
    # would recompile.
    splits = triton.next_power_of_2(max(1, min(triton.cdiv(max_len, block_s), target_programs // n_kv_heads)))
    min_chunk = triton.cdiv(max(min_chunk, block_s), block_s) * block_s
    block_half = max(16, triton.next_power_of_2(head_dim // 2))
    out = torch.empty(batch, n_heads, head_dim, dtype=q.dtype, device=q.device)
    m = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    acc = torch.empty(batch, n_heads, splits, 2 * block_half, dtype=torch.float32, device=q.device)
    if counters is None:
        counters = torch.zeros(batch, n_kv_heads, dtype=torch.int32, device=q.device)
    elif counters.dtype != torch.int32 or counters.shape[0] < batch or counters.shape[1] != n_kv_heads:
        raise ValueError(f"counters must be int32 [>= {batch}, {n_kv_heads}] zeros, got {counters.dtype} "
                         f"{list(counters.shape)}")
    cos, sin = rope if rope is not None else (m, m)  # placeholders, never read without ROPE
    rows = q.view(batch, -1, head_dim) if rope is not None else q
    use_pdl = pdl.active(q)
    _decode_attention_kernel[(batch, n_kv_heads, splits)](
        rows, k_cache, v_cache, lengths, out, m, denom, acc, counters, cos, sin, window or 0, head_dim,
        rows.stride(0), rows.stride(1), lengths.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), m.stride(0), m.stride(1), counters.stride(0),
        cos.stride(0), cos.stride(-1), sin.stride(0), sin.stride(-1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_S=block_s, BLOCK_HALF=block_half,
        SPLITS=splits, BLOCK_GC=triton.next_power_of_2(group), COMBINE=min(COMBINE_SPLITS, splits),
        MIN_CHUNK=min_chunk, SINGLE_SPAN=single_span, SCALE=1.0 / math.sqrt(head_dim),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # bf16 operands ignore it
        ROPE=rope is not None, PDL=use_pdl, RELEASE_AFTER_FIRST_TILE=release_after_first_tile,
        PREFETCH=PREFETCH_CHUNK and rope is not None and use_pdl, num_warps=4, num_stages=2,
        **pdl.launch_options(use_pdl))
    return out


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, window: int | None = None,
                     counters: Tensor | None = None, block_s: int = 64, target_programs: int = TARGET_PROGRAMS,
                     min_chunk: int = MIN_CHUNK, single_span: int = SINGLE_SPAN) -> Tensor:
    """Softmax attention of q [B, Hq, D] over each row's first lengths[b] cache slots (the last `window`
    of them with a sliding window), k/v_cache [B', Hkv, S, D] (B' >= B); returns [B, Hq, D] in q's dtype.

    counters: int32 [>= B, Hkv] zeros that the kernel uses and leaves at zero (a static buffer in a
    CUDA graph; allocated per call when None). A row is cut into chunks of >= min_chunk slots, at most
    target_programs / Hkv of them; a row of at most single_span slots (within its window) is one chunk."""
    return _attend(q, k_cache, v_cache, lengths, window, q.shape[1], q.shape[2], counters, None, block_s,
                   target_programs, min_chunk, single_span)


def rope_cache_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                         positions: Tensor, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None = None,
                         counters: Tensor | None = None, block_s: int = 64, target_programs: int = TARGET_PROGRAMS,
                         min_chunk: int = MIN_CHUNK, single_span: int = SINGLE_SPAN,
                         release_after_first_tile: bool = False) -> Tensor:
    """A decode step's attention in one kernel: rotate q and k of qkv [B, (Hq + 2 Hkv) * D] with row
    positions[b] of the rotary tables cos, sin [P, D / 2] (any strides; model.rope_tables' two halves), write
    k and v at positions [B] of k/v_cache [B', Hkv, S, D] (in place) and attend to each row's slots up to
    its position: what reference_rope_and_cache_write (with cos[positions], sin[positions]) then
    reference_decode_attention (lengths = positions + 1) give. Returns [B, Hq, D] in qkv's dtype.
    The tables are read by the kernel, not gathered before it: in a compiled step Inductor copied a
    gathered row into its own buffer for every layer's call (16 extra kernels a Mixtral step).
    release_after_first_tile: with PDL, the next kernel's programs are let in once each program has attended
    to its first tile of cached keys rather than first thing (for an output projection that loads its whole
    weight before its own wait)."""
    if qkv.shape[-1] != (n_heads + 2 * n_kv_heads) * head_dim or k_cache.shape[1] != n_kv_heads:
        raise ValueError(f"qkv [B, {(n_heads + 2 * n_kv_heads) * head_dim}] and caches of {n_kv_heads} kv heads "
                         f"expected, got {list(qkv.shape)} and {list(k_cache.shape)}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if pdl.compiled_launch(qkv):
        if counters is None:
            counters = torch.zeros(qkv.shape[0], n_kv_heads, dtype=torch.int32, device=qkv.device)
        return torch.ops.gpt_fast_mixtral.rope_cache_attention(
            qkv, cos, sin, k_cache, v_cache, positions, counters, n_heads, head_dim, window or 0, block_s,
            target_programs, min_chunk, single_span, release_after_first_tile)
    return _attend(qkv, k_cache, v_cache, positions, window, n_heads, head_dim, counters, (cos, sin), block_s,
                   target_programs, min_chunk, single_span, release_after_first_tile)


@torch.library.custom_op("gpt_fast_mixtral::rope_cache_attention", mutates_args=("k_cache", "v_cache", "counters"))
def _rope_cache_attention_op(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                             positions: Tensor, counters: Tensor, n_heads: int, head_dim: int, window: int,
                             block_s: int, target_programs: int, min_chunk: int, single_span: int,
                             release_after_first_tile: bool) -> Tensor:
    """rope_cache_attention launched by compiled code (kernels.pdl); window 0: none."""
    return _attend(qkv, k_cache, v_cache, positions, window or None, n_heads, head_dim, counters, (cos, sin),
                   block_s, target_programs, min_chunk, single_span, release_after_first_tile)


@_rope_cache_attention_op.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, counters: Tensor,
      n_heads: int, head_dim: int, window: int, block_s: int, target_programs: int, min_chunk: int,
      single_span: int, release_after_first_tile: bool) -> Tensor:
    return qkv.new_empty(qkv.shape[0], n_heads, head_dim)


# ---------------------------------------------------------------------------------------------------
# Rotary embedding: the decode step's reference (rope_cache_attention does it in its kernel) and prefill's
# kernel.

def reference_rope_and_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                                   positions: Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> Tensor:
    """What model.Attention does for one token per row: rotate q and k of qkv [B, (Hq + 2 Hkv) * D] with
    cos, sin [B, D / 2], write k and v at positions [B] of k/v_cache [B', Hkv, S, D] (in place); return q
    rotated, [B, Hq, D]."""
    from gpt_fast_mixtral.model import apply_rope

    batch = qkv.shape[0]
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q = apply_rope(q.reshape(batch, n_heads, head_dim), cos, sin)
    k = apply_rope(k.reshape(batch, n_kv_heads, head_dim), cos, sin)
    rows = torch.arange(batch, device=qkv.device)
    k_cache[rows, :, positions] = k
    v_cache[rows, :, positions] = v.reshape(batch, n_kv_heads, head_dim)
    return q


if triton is not None:

    @triton.jit
    def _rope_rows_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, heads, head_dim, stride_qkv, stride_cos_t,
                          stride_cos_d, stride_sin_t, stride_sin_d, stride_out, BLOCK_H: tl.constexpr,
                          BLOCK_HALF: tl.constexpr):
        """Program (token, block of heads): rotate BLOCK_H of the token's query and key heads (the first
        `heads` head_dim-wide columns of its qkv row) into out."""
        t = tl.program_id(0).to(tl.int64)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        half = head_dim // 2
        offs = tl.arange(0, BLOCK_HALF)
        mask_d = offs < half
        mask = (offs_h[:, None] < heads) & mask_d[None, :]
        cos = tl.load(cos_ptr + t * stride_cos_t + offs * stride_cos_d, mask=mask_d, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * stride_sin_t + offs * stride_sin_d, mask=mask_d, other=0.0).to(tl.float32)
        columns = offs_h[:, None] * head_dim + offs[None, :]
        x1 = tl.load(qkv_ptr + t * stride_qkv + columns, mask=mask, other=0.0)
        x2 = tl.load(qkv_ptr + t * stride_qkv + half + columns, mask=mask, other=0.0)
        out1, out2 = _rotate(x1, x2, cos[None, :], sin[None, :])
        tl.store(out_ptr + t * stride_out + columns, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + t * stride_out + half + columns, out2.to(out_ptr.dtype.element_ty), mask=mask)


def rope_rows(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> Tensor:
    """Prefill's rotary embedding in one kernel: qkv [T, (Hq + 2 Hkv) * D] (rows of any stride, columns
    contiguous), cos and sin [T, D / 2]; returns the rotated query and key heads, [T, (Hq + Hkv) * D]
    (what model.apply_rope gives for each, in qkv's dtype). Eager PyTorch takes ~10 kernels over q and
    k and Inductor's dynamic-shape kernel ran at ~0.5 TB/s on an H200."""
    tokens = qkv.shape[0]
    if qkv.stride(-1) != 1:
        raise ValueError("qkv's columns must be contiguous")
    heads = n_heads + n_kv_heads
    out = torch.empty(tokens, heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    block_h = 4
    if tokens:
        _rope_rows_kernel[(tokens, triton.cdiv(heads, block_h))](
            qkv, cos, sin, out, heads, head_dim, qkv.stride(0), cos.stride(0), cos.stride(1), sin.stride(0),
            sin.stride(1), out.stride(0), BLOCK_H=block_h,
            BLOCK_HALF=max(16, triton.next_power_of_2(head_dim // 2)), num_warps=4)
    return out
