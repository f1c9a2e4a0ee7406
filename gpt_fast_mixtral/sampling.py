"""Batched sampling where every row has its own temperature, top-k, top-p and seed.

Randomness comes from a counter-based hash of (seed, step, token id) instead of a stateful generator:
the same request draws the same numbers whether it runs alone or in a batch, on one GPU or on every
rank of a tensor-parallel group, and the whole step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply) on int64 tensors; products stay below 2**63."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Uniform numbers in (0, 1), [B, V] float32, a pure function of (seed, step, token id)."""
    row = _mix32(seeds ^ _mix32((seeds >> 32) + 0x3C6EF372))
    row = _mix32(row ^ _mix32(steps + 0x1B873593))
    token = _mix32(torch.arange(vocab_size, device=seeds.device) + 0x2545F491)
    # 23 random bits: (bits + 0.5) / 2**23 is exact in float32 and at most 1 - 2**-24. With 24 bits the
    # largest value rounds to exactly 1.0, whose Gumbel noise is +inf: that token would win whatever its
    # probability, even one that top-k or top-p removed.
    bits = _mix32(row[:, None] ^ token[None, :]) >> 9
    return (bits.float() + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingTensors:
    """Per-row sampling settings as device tensors ([B] each)."""

    temperature: Tensor  # float32; 0 means greedy
    top_k: Tensor  # int64; vocab size when unset
    top_p: Tensor  # float32; 1.0 when unset
    seed: Tensor  # int64


def sample(logits: Tensor, settings: SamplingTensors, steps: Tensor) -> Tensor:
    """Next token per row from logits [B, V]."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / settings.temperature.clamp_min(1e-5)[:, None]
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    removed = rank[None, :] >= settings.top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p; the most likely token always stays.
    removed = (mass_before >= settings.top_p[:, None]) & (settings.top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(settings.seed, steps, logits.shape[-1])))
    choice = (sorted_logits + gumbel.gather(1, sorted_ids)).argmax(dim=-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    return torch.where(settings.temperature > 0, sampled, greedy)
