"""All-reduce of decode-sized activations in one kernel, by pushing into the peers' memory.

A batch-1 decode step of a tensor-parallel model all-reduces 8 KB twice per layer. What such an all-reduce
costs is latency, not bandwidth: NCCL's ring takes several kernel steps, and PyTorch's symmetric-memory
one-shot (`symm_mem.one_shot_all_reduce`) copies into its own buffer, runs a barrier (a signal to every
peer and a wait) and then reads every peer's buffer over NVLink, two round trips. Here each rank instead
writes its partial sum straight into its slot of every rank's receive buffer and then waits, reading only
its own memory, until every slot is full:

    buffers[rank] = [3 phases][W slots][capacity]   (symmetric memory: rank r's buffer is mapped on all ranks)
    push:  buffers[peer][phase][rank][:n] = x        for every peer (its own buffer too)
    wait:  poll buffers[rank][phase][r][:n] until no element holds the sentinel, for r = 0..W-1
    sum:   out = sum over r in rank order, in float32 (the same bits on every rank)
    reset: buffers[rank][phase][r][:n] = sentinel

"Full" is told per element: an empty slot holds the bit pattern of negative zero (the sentinel), and a
pushed value that is negative zero is sent as positive zero, which sums the same. So no flag and no fence
is needed: an element is there once its bits are not the sentinel's (2- and 4-byte stores are not torn).

Three phases in turn make reuse safe without a barrier: a peer pushes into phase p of our buffer again only
for the all-reduce three calls later, and to get there it needed our contribution to the call before it,
which we pushed after our reset of phase p (kernel boundaries order the two). Every program keeps its own
phase counter (`counters[pid]`), and the grid is always the same `programs` wide (each program loops over
its share of the elements), so every counter steps once per call and they all agree, on every rank, under
CUDA graph replay too (a capture runs nothing, on every rank alike).

All ranks must run the same sequence of all-reduces (what tensor parallel decode does). A rank that never
arrives leaves its peers spinning: the caller's timeout (torchrun, TorchServe) is the guard, as for NCCL.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

PHASES = 3
# Elements per program and chunk, and programs per launch (the grid never changes; see the counters above):
# a batch-8 decode step's 32768 elements go out in one chunk per program.
BLOCK = 1024
PROGRAMS = 32
# Bits of negative zero, read as the same-width integer: an empty slot.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SENTINEL = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}


def bits_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _BITS:
        raise ValueError(f"push all-reduce supports {', '.join(map(str, _BITS))}, not {dtype}")
    return _BITS[dtype]


def sentinel(dtype: torch.dtype) -> int:
    return _SENTINEL[bits_dtype(dtype)]


def buffer_elements(world_size: int, capacity: int) -> int:
    """Elements of one rank's receive buffer for all-reduces of up to `capacity` elements."""
    return PHASES * world_size * capacity


def reference_all_reduce(partials: list[Tensor]) -> Tensor:
    """What every rank gets: the partial sums of ranks 0..W-1 added in that order in float32."""
    total = torch.zeros_like(partials[0], dtype=torch.float32)
    for partial in partials:
        total += partial.float()
    return total.to(partials[0].dtype)


if triton is not None:

    @triton.jit
    def _push_all_reduce_kernel(x_ptr, out_ptr, buffers_ptr, counters_ptr, numel, capacity,
                                BITS: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                PHASES: tl.constexpr, SENTINEL: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        phase = tl.load(counters_ptr + pid)
        own = tl.multiple_of(tl.load(buffers_ptr + RANK).to(tl.pointer_type(BITS)), 16)  # symmetric buffers are aligned
        phase_base = phase.to(tl.int64) * WORLD * capacity
        # all of this program's chunks go out first, so that the waits below overlap one latency
        for start in range(pid * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            bits = tl.load(x_ptr + offs, mask=mask).to(BITS, bitcast=True)
            bits = tl.where(bits == SENTINEL, 0, bits)  # -0.0 is sent as +0.0
            for peer in tl.static_range(WORLD):
                dst = tl.multiple_of(tl.load(buffers_ptr + peer).to(tl.pointer_type(BITS)), 16)
                tl.store(dst + phase_base + RANK * capacity + offs, bits, mask=mask)
        for start in range(pid * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for src in tl.static_range(WORLD):
                slot = own + phase_base + src * capacity + offs
                got = tl.load(slot, mask=mask, other=0, volatile=True)
                while tl.max((got == SENTINEL).to(tl.int32), axis=0) > 0:
                    got = tl.load(slot, mask=mask, other=0, volatile=True)
                total += got.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
                tl.store(slot, tl.full([BLOCK], SENTINEL, BITS), mask=mask)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(counters_ptr + pid, (phase + 1) % PHASES)

    _TL_BITS = {torch.int16: tl.int16, torch.int32: tl.int32}


class PushAllReduce:
    """One rank's side of the push all-reduce for one dtype.

    `buffers`: the W ranks' receive buffers as addresses this rank can write to (an int64 tensor of W
    device pointers, each to PHASES * W * capacity elements of `bits_dtype(dtype)`, initialised to the
    sentinel on every rank before any rank runs a call); `counters`: `programs` int32 zeros on this
    rank's device. Over symmetric memory the buffers come from `tp.enable_one_shot_all_reduce`; a test
    can pass ordinary tensors of one process.
    """

    def __init__(self, dtype: torch.dtype, rank: int, world_size: int, capacity: int, buffers: Tensor,
                 counters: Tensor, block: int = BLOCK) -> None:
        if buffers.dtype != torch.int64 or buffers.numel() != world_size:
            raise ValueError(f"buffers must be {world_size} int64 addresses, got {buffers.dtype} "
                             f"{tuple(buffers.shape)}")
        self.dtype, self.capacity, self.buffers, self.counters = dtype, capacity, buffers, counters
        self.constants = dict(BITS=_TL_BITS[bits_dtype(dtype)], RANK=rank, WORLD=world_size, PHASES=PHASES,
                              SENTINEL=sentinel(dtype), BLOCK=block)

    def fits(self, x: Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.capacity

    def __call__(self, x: Tensor) -> Tensor:
        if not self.fits(x):
            raise ValueError(f"push all-reduce of {self.dtype} up to {self.capacity} elements, got {x.dtype} "
                             f"{x.numel()}")
        x = x.contiguous()
        out = torch.empty_like(x)
        _push_all_reduce_kernel[(self.counters.numel(),)](
            x, out, self.buffers, self.counters, x.numel(), self.capacity, **self.constants, num_warps=4)
        return out
