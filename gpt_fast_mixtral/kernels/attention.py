"""Decode attention that reads only the filled part of the static KV cache.

A CUDA-graph decode step has static shapes, so SDPA over the cache reads all max_seq_len slots of every
layer on every step (at 8k slots, 35 MB per layer for Mixtral: more than its attention weights). This
kernel takes each row's length from a device tensor instead: programs over (row, kv head, split of the
sequence) stop at the row's length (and start at its sliding window), each writes a partial softmax
(max, sum, weighted values) for the group of query heads sharing the kv head, and a second kernel
combines the splits. `reference_decode_attention` is the plain PyTorch definition it is tested against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gpt_fast_mixtral.kernels import moe

triton = moe.triton
if triton is not None:
    import triton.language as tl


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
    def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, window, split_len,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_pb, stride_ph,
                      head_dim, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_D: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(len_ptr + b).to(tl.int32)
        lo = split * split_len
        if window > 0:
            lo = tl.maximum(lo, length - window)
        hi = tl.minimum((split + 1) * split_len, length)
        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < GROUP
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        heads = kv_head * GROUP + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        kv_base = b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        for s0 in range(lo, hi, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < hi
            kv_offsets = kv_base + offs_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
            kv_mask = mask_s[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
            scores = tl.where(mask_s[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        partial = b * stride_pb + heads * stride_ph + split
        tl.store(m_ptr + partial, m, mask=mask_g)
        tl.store(l_ptr + partial, denom, mask=mask_g)
        tl.store(acc_ptr + partial[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask_g[:, None])

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_pb, stride_ph, stride_ob, stride_oh,
                        head_dim, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, BLOCK_SPLITS)
        mask = offs < num_splits
        partial = b * stride_pb + head * stride_ph + offs
        m = tl.load(m_ptr + partial, mask=mask, other=float("-inf"))
        denom = tl.load(l_ptr + partial, mask=mask, other=0.0)
        m_all = tl.max(m, axis=0)
        weight = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.load(acc_ptr + partial[:, None] * BLOCK_D + offs_d[None, :], mask=mask[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=offs_d < head_dim)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, window: int | None = None,
                     block_s: int = 64, target_programs: int = 512) -> Tensor:
    """Softmax attention of q [B, Hq, D] over each row's first lengths[b] cache slots (the last `window`
    of them with a sliding window), k/v_cache [B, Hkv, S, D]; returns [B, Hq, D] in q's dtype."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout with contiguous head_dim")
    # Enough splits to fill the GPU at the longest length for one row; splits past a row's length exit
    # at once. Not a function of the batch size: a compiled step with a dynamic batch would recompile.
    splits = max(1, min(triton.cdiv(max_len, block_s), target_programs // n_kv_heads))
    split_len = triton.cdiv(triton.cdiv(max_len, splits), block_s) * block_s
    splits = triton.cdiv(max_len, split_len)
    q = q.contiguous()
    m = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    block_d = max(16, triton.next_power_of_2(head_dim))
    acc = torch.empty(batch, n_heads, splits, block_d, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # bf16 operands ignore it
    _split_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, lengths, m, denom, acc, window or 0, split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), m.stride(0), m.stride(1),
        head_dim, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_S=block_s, BLOCK_D=block_d,
        SCALE=1.0 / math.sqrt(head_dim),
        PRECISION=precision, num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _combine_kernel[(batch, n_heads)](m, denom, acc, out, splits, m.stride(0), m.stride(1), out.stride(0),
                                      out.stride(1), head_dim, BLOCK_SPLITS=triton.next_power_of_2(splits),
                                      BLOCK_D=block_d, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------
# Rotary embedding and KV-cache write of a decode step in one kernel.

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
    def _rotate(x1, x2, cos, sin):
        """The rotated halves of a head (half-split layout), in float32."""
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_ptr, v_ptr, n_heads, n_kv_heads,
                           head_dim, stride_qkv, stride_cos_b, stride_cos_d, stride_sin_b, stride_sin_d,
                           stride_qob, stride_qoh, stride_kb, stride_kh, stride_ks, BLOCK_HALF: tl.constexpr):
        """Program (row, head): heads [0, Hq) rotate a query head into q_out; heads [Hq, Hq + Hkv) rotate
        a key head and write it and the matching value head into the caches at the row's position."""
        b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half = head_dim // 2
        offs = tl.arange(0, BLOCK_HALF)
        mask = offs < half
        cos = tl.load(cos_ptr + b * stride_cos_b + offs * stride_cos_d, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_sin_b + offs * stride_sin_d, mask=mask, other=0.0).to(tl.float32)
        row = qkv_ptr + b * stride_qkv
        kv_head = head - n_heads
        is_key = kv_head >= 0
        src = tl.where(is_key, n_heads * head_dim + kv_head * head_dim, head * head_dim)
        x1 = tl.load(row + src + offs, mask=mask, other=0.0)
        x2 = tl.load(row + src + half + offs, mask=mask, other=0.0)
        out1, out2 = _rotate(x1, x2, cos, sin)
        out1, out2 = out1.to(x1.dtype), out2.to(x1.dtype)
        if is_key:
            position = tl.load(pos_ptr + b).to(tl.int64)
            slot = b * stride_kb + kv_head.to(tl.int64) * stride_kh + position * stride_ks
            tl.store(k_ptr + slot + offs, out1.to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(k_ptr + slot + half + offs, out2.to(k_ptr.dtype.element_ty), mask=mask)
            value = row + (n_heads + n_kv_heads) * head_dim + kv_head * head_dim
            for d0 in range(0, head_dim, BLOCK_HALF):  # the value head, copied as it is
                offs_v = d0 + offs
                tl.store(v_ptr + slot + offs_v, tl.load(value + offs_v, mask=offs_v < head_dim),
                         mask=offs_v < head_dim)
        else:
            out = q_out_ptr + b * stride_qob + head * stride_qoh
            tl.store(out + offs, out1, mask=mask)
            tl.store(out + half + offs, out2, mask=mask)


def rope_and_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                         positions: Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> Tensor:
    """The fused kernel: what reference_rope_and_cache_write does and returns (head_dim even)."""
    batch = qkv.shape[0]
    if qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("qkv rows and the caches' head_dim must be contiguous, k and v caches alike")
    q = torch.empty(batch, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(batch, n_heads + n_kv_heads)](
        qkv, cos, sin, positions, q, k_cache, v_cache, n_heads, n_kv_heads, head_dim,
        qkv.stride(0), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_HALF=max(16, triton.next_power_of_2(head_dim // 2)), num_warps=1)
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
