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

`PushAllReduce.residual_norm` is the same exchange fused with what a tensor-parallel block does with the
sum (tp.TensorParallelBlock): one program per row waits for the whole row, adds the residual, normalises
it and, after the attention, routes it to its experts (kernels.router's arithmetic). It shares the
buffers, the counters and the grid of the plain kernel, so the two may follow each other in any order.

On sm_90+ both kernels launch with PDL (kernels.pdl), so a tensor-parallel decode layer is one chain of
kernels: they release the next kernel first thing and wait for the one before (which writes the partial
sums) before reading anything but the norm and router weights, the counters included (two push kernels
may follow each other). The next kernel's programs, scheduled early, only wait: they cannot hold back
a push program, which is resident by then, nor a peer's.

All ranks must run the same sequence of all-reduces (what tensor parallel decode does). A rank that never
arrives leaves its peers spinning: the caller's timeout (torchrun, TorchServe) is the guard, as for NCCL.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    from gpt_fast_mixtral.kernels.moe import _split_sum
    from gpt_fast_mixtral.kernels.pdl import pdl_release, pdl_wait
    from gpt_fast_mixtral.kernels.router import normed_row, rms_rstd, single_pass, store_routing
except ImportError:  # CPU-only installs
    triton = None

from gpt_fast_mixtral.kernels import pdl

# Elements of a row that the fused kernels (PushAllReduce.residual_norm) hold in registers, and of the
# router weights with it (kernels.router.single_pass): wider models take the separate kernels.
ROW_ELEMENTS = 1 << 14

PHASES = 3
# The push kernels launch with PDL where kernels.pdl is active; False: the plain way (comparisons:
# scripts/benchmark.py --no-push-pdl). Int8 Mixtral-8x7B tp2 on two H200s, alternating in one call
# (session 23, results/h200x2_s23d_*): 423.8 / 423.0 tok/s against 406.3 / 408.0 without. The next
# kernel's programs come in while the exchange waits on the peer and load what they may before their own
# wait (wqkv after the norm's push: two weight tiles; gate_up after the routing's push waits first).
# Session 16 measured no gain with the one-tile linears of then (likely the difference; not isolated).
PDL = True
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


def reference_all_reduce(partials: list[Tensor], round_each_add: bool = False) -> Tensor:
    """What every rank gets: the partial sums of ranks 0..W-1 added in that order, in float32 and rounded
    once to their dtype (the push kernel), or with `round_each_add` rounded to it after every add, as
    PyTorch's symmetric-memory one-shot kernel does (torch 2.11: bfloat16 adds of pairs of elements)."""
    if round_each_add:
        total = partials[0]
        for partial in partials[1:]:
            total = total + partial  # 16-bit adds are computed in float32 and rounded once: the exact add
        return total
    total = torch.zeros_like(partials[0], dtype=torch.float32)
    for partial in partials:
        total += partial.float()
    return total.to(partials[0].dtype)


if triton is not None:

    @triton.jit
    def _send(values, buffers_ptr, at, mask, BITS: tl.constexpr, WORLD: tl.constexpr, SENTINEL: tl.constexpr):
        """Store `values` at element offset `at` (phase, this rank's slot and position) of every rank's
        buffer, its own included; a -0.0 is sent as +0.0."""
        bits = values.to(BITS, bitcast=True)
        bits = tl.where(bits == SENTINEL, 0, bits)
        for peer in tl.static_range(WORLD):
            dst = tl.multiple_of(tl.load(buffers_ptr + peer).to(tl.pointer_type(BITS)), 16)  # symmetric: aligned
            tl.store(dst + at, bits, mask=mask)

    @triton.jit
    def _receive_sum(own, at, capacity, mask, dtype: tl.constexpr, BITS: tl.constexpr, WORLD: tl.constexpr,
                     SENTINEL: tl.constexpr, BLOCK: tl.constexpr):
        """The float32 sum, in rank order, of what every rank sent to offset `at` (phase and position) of
        slots 0..W-1 of our buffer `own`: each slot is waited for until no element is empty, then emptied."""
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for src in tl.static_range(WORLD):
            slot = own + at + src * capacity
            got = tl.load(slot, mask=mask, other=0, volatile=True)
            while tl.max((got == SENTINEL).to(tl.int32), axis=0) > 0:
                got = tl.load(slot, mask=mask, other=0, volatile=True)
            total += got.to(dtype, bitcast=True).to(tl.float32)
            tl.store(slot, tl.full([BLOCK], SENTINEL, BITS), mask=mask)
        return total

    @triton.jit
    def _push_all_reduce_kernel(x_ptr, out_ptr, buffers_ptr, counters_ptr, numel, capacity,
                                BITS: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                PHASES: tl.constexpr, SENTINEL: tl.constexpr, BLOCK: tl.constexpr,
                                PDL: tl.constexpr = False):
        pdl_release(PDL)
        pdl_wait(PDL)
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        phase = tl.load(counters_ptr + pid)
        own = tl.multiple_of(tl.load(buffers_ptr + RANK).to(tl.pointer_type(BITS)), 16)  # symmetric buffers are aligned
        phase_base = phase.to(tl.int64) * WORLD * capacity
        # all of this program's chunks go out first, so that the waits below overlap one latency
        for start in range(pid * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            _send(tl.load(x_ptr + offs, mask=mask), buffers_ptr, phase_base + RANK * capacity + offs, mask, BITS,
                  WORLD, SENTINEL)
        for start in range(pid * BLOCK, numel, programs * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            total = _receive_sum(own, phase_base + offs, capacity, mask, x_ptr.dtype.element_ty, BITS, WORLD,
                                 SENTINEL, BLOCK)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(counters_ptr + pid, (phase + 1) % PHASES)

    @triton.jit
    def _push_residual_norm_kernel(part_ptr, x_ptr, h_ptr, normed_ptr, norm_w_ptr, gate_w_ptr, weights_ptr, ids_ptr,
                                   buffers_ptr, counters_ptr, rows, dim, num_experts, eps, capacity,
                                   stride_part, stride_x, stride_h, stride_normed, stride_gate, stride_split,
                                   BITS: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                   PHASES: tl.constexpr, SENTINEL: tl.constexpr, BLOCK_D: tl.constexpr,
                                   ROUTE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                                   BLOCK_E: tl.constexpr, PDL: tl.constexpr = False, SPLIT: tl.constexpr = 0,
                                   PART_K: tl.constexpr = 1):
        """The push all-reduce of `rows` rows of `dim` partial sums, one whole row per program at a time, and
        what the model does next with the sum: h = x + sum, normed = RMSNorm(h) and, with ROUTE, the routing
        of normed (kernels.router). Slots, phases and counters as _push_all_reduce_kernel (the same grid, so
        both kernels may share one buffer and its counters); row r's elements sit at r * dim. PDL: the norm
        and router weights are loaded before the wait for the kernel before.
        SPLIT > 0: part_ptr holds the expert kernels' float32 partials [SPLIT, rows * PART_K, dim] (strides
        stride_split, stride_part) and this rank's partial sum of row r is their kernels.moe._split_sum,
        rounded to x's dtype: what kernels.moe.block_end would have written, without its kernel."""
        pdl_release(PDL)
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        norm_w = tl.load(norm_w_ptr + offs_d, mask=mask_d, other=0.0)
        if ROUTE:  # loaded while the kernel before finishes, or the peers' parts are on their way
            offs_e = tl.arange(0, BLOCK_E)
            gate_w = tl.load(gate_w_ptr + offs_e[:, None] * stride_gate + offs_d[None, :],
                             mask=(offs_e < num_experts)[:, None] & mask_d[None, :], other=0.0)
        pdl_wait(PDL)
        phase = tl.load(counters_ptr + pid)
        own = tl.multiple_of(tl.load(buffers_ptr + RANK).to(tl.pointer_type(BITS)), 16)
        phase_base = phase.to(tl.int64) * WORLD * capacity
        for row in range(pid, rows, programs):
            if SPLIT > 0:
                part = _split_sum(part_ptr, tl.cast(row, tl.int64), offs_d, mask_d, stride_split, stride_part, SPLIT,
                                  PART_K).to(x_ptr.dtype.element_ty)
            else:
                part = tl.load(part_ptr + row * stride_part + offs_d, mask=mask_d)
            _send(part, buffers_ptr, phase_base + RANK * capacity + row * dim + offs_d, mask_d, BITS, WORLD,
                  SENTINEL)
        for row in range(pid, rows, programs):
            x = tl.load(x_ptr + row * stride_x + offs_d, mask=mask_d, other=0.0)
            total = _receive_sum(own, phase_base + row * dim + offs_d, capacity, mask_d, x_ptr.dtype.element_ty, BITS,
                                 WORLD, SENTINEL, BLOCK_D)
            h = x + total.to(x_ptr.dtype.element_ty)  # the all-reduce's output, then the residual add
            tl.store(h_ptr + row * stride_h + offs_d, h, mask=mask_d)
            normed = normed_row(h, norm_w, rms_rstd(h, dim, eps))
            tl.store(normed_ptr + row * stride_normed + offs_d, normed, mask=mask_d)
            if ROUTE:
                logits = tl.sum(gate_w.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1)
                store_routing(logits.to(x_ptr.dtype.element_ty), row, num_experts, weights_ptr, ids_ptr, TOP_K,
                              BLOCK_K, BLOCK_E)
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
        self.dtype, self.capacity, self.buffers, self.counters, self.block = dtype, capacity, buffers, counters, block
        # the constants both kernels take
        self.constants = dict(BITS=_TL_BITS[bits_dtype(dtype)], RANK=rank, WORLD=world_size, PHASES=PHASES,
                              SENTINEL=sentinel(dtype))

    def fits(self, x: Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.capacity

    def fits_rows(self, partial: Tensor, gate_weight: Tensor | None = None) -> bool:
        """Whether residual_norm takes this partial sum [N, D] (and router weights [E, D])."""
        dim = partial.shape[-1]
        return self.fits(partial) and triton.next_power_of_2(dim) <= ROW_ELEMENTS and (
            gate_weight is None or single_pass(dim, gate_weight.shape[0]))

    def residual_norm(self, partial: Tensor, x: Tensor, norm_weight: Tensor, eps: float,
                      gate_weight: Tensor | None = None, top_k: int = 0) -> tuple[Tensor, ...]:
        """For this rank's partial sum and the residual x, both [N, D] in this runner's dtype: h = x + the
        all-reduced sum and normed = RMSNorm(h) * norm_weight (as model.RMSNorm rounds), and with
        gate_weight [E, D] the routing of normed (weights [N, top_k] in x's dtype, int64 ids; as
        kernels.router.residual_norm_route). One kernel."""
        if not self.fits_rows(partial, gate_weight) or x.shape != partial.shape or x.dtype != partial.dtype:
            raise ValueError(f"fused push all-reduce of {self.dtype} rows up to {ROW_ELEMENTS} wide and "
                             f"{self.capacity} elements, got {partial.dtype} {tuple(partial.shape)} and x "
                             f"{x.dtype} {tuple(x.shape)}")
        partial = partial.contiguous()
        return self._residual_norm(partial, partial.stride(0), 0, 0, 1, x, norm_weight, eps, gate_weight, top_k)

    def residual_norm_partials(self, partials: Tensor, top_k: int, x: Tensor, norm_weight: Tensor,
                               eps: float) -> tuple[Tensor, Tensor]:
        """residual_norm (no routing) of this rank's partial sum given as the expert kernels' float32
        partials [split, N * top_k, D] (kernels.moe.fused_moe_partials): the kernel sums them as
        kernels.moe.block_end does and rounds the sum to x's dtype, so the result has the same bits as
        residual_norm(block_end(partials, top_k, x.dtype), x, ...), one kernel fewer."""
        split, slots, dim = partials.shape
        if (partials.dtype != torch.float32 or top_k < 1 or slots != x.shape[0] * top_k or x.dim() != 2
                or x.shape[1] != dim or not self.fits_rows(x)):
            raise ValueError(f"float32 partials [split, N * {top_k}, D] and x [N, D] of {self.dtype} (rows up to "
                             f"{ROW_ELEMENTS} wide, {self.capacity} elements) expected, got {partials.dtype} "
                             f"{tuple(partials.shape)} and x {x.dtype} {tuple(x.shape)}")
        if partials.stride(-1) != 1:
            partials = partials.contiguous()
        return self._residual_norm(partials, partials.stride(1), partials.stride(0), split, top_k, x, norm_weight,
                                   eps, None, 0)

    def _residual_norm(self, part: Tensor, stride_part: int, stride_split: int, split: int, part_k: int, x: Tensor,
                       norm_weight: Tensor, eps: float, gate_weight: Tensor | None, top_k: int) -> tuple[Tensor, ...]:
        x = x.contiguous()
        rows, dim = x.shape
        h, normed = torch.empty_like(x), torch.empty_like(x)
        route = gate_weight is not None
        if route:
            num_experts = gate_weight.shape[0]
            weights = torch.empty(rows, top_k, dtype=x.dtype, device=x.device)
            ids = torch.empty(rows, top_k, dtype=torch.int64, device=x.device)
        else:  # placeholders, never touched
            num_experts, gate_weight, weights, ids = 1, norm_weight, h, h
        use_pdl = PDL and pdl.active(x)
        _push_residual_norm_kernel[(self.counters.numel(),)](
            part, x, h, normed, norm_weight, gate_weight, weights, ids, self.buffers, self.counters, rows, dim,
            num_experts, eps, self.capacity, stride_part, x.stride(0), h.stride(0), normed.stride(0),
            gate_weight.stride(0), stride_split, **self.constants, BLOCK_D=triton.next_power_of_2(dim), ROUTE=route,
            TOP_K=max(top_k, 1), BLOCK_K=max(2, triton.next_power_of_2(top_k)),
            BLOCK_E=max(2, triton.next_power_of_2(num_experts)), PDL=use_pdl, SPLIT=split, PART_K=part_k,
            num_warps=16, **pdl.launch_options(use_pdl))
        return (h, normed, weights, ids) if route else (h, normed)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.fits(x):
            raise ValueError(f"push all-reduce of {self.dtype} up to {self.capacity} elements, got {x.dtype} "
                             f"{x.numel()}")
        x = x.contiguous()
        out = torch.empty_like(x)
        use_pdl = PDL and pdl.active(x)
        _push_all_reduce_kernel[(self.counters.numel(),)](
            x, out, self.buffers, self.counters, x.numel(), self.capacity, **self.constants, BLOCK=self.block,
            PDL=use_pdl, num_warps=4, **pdl.launch_options(use_pdl))
        return out
