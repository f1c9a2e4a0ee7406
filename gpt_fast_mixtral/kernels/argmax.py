"""The end of a greedy decode step in one kernel: each row's argmax token and its next position.

A compiled decode step ended with two Inductor kernels after the output head: the argmax (one program
looping over the vocabulary, ~7 us on an H200 for Mixtral's 32000 logits) and the positions' increment,
both launched the plain way, i.e. after the head had finished. `greedy_state` does both in one kernel
launched with programmatic dependent launch (kernels.pdl): its programs are resident before the head ends,
read their row's position before the wait (a step input no kernel of the step writes) and load the logits
in wide passes after it.

Semantics are torch's: the first index of a row's largest logit, and the first NaN where a row has one
(torch.argmax takes NaN as the largest). `reference_greedy_state` is the plain PyTorch definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpt_fast_mixtral.kernels import moe, pdl

triton = moe.triton
if triton is not None:
    import triton.language as tl

    from gpt_fast_mixtral.kernels.pdl import pdl_release, pdl_wait

    _NO_INDEX = tl.constexpr(2**31 - 1)  # larger than any index: "none yet"

# Logits one program loads at once (16 warps: 32 a thread); Mixtral's 32000 take two passes.
BLOCK = 16384


def available(x: Tensor) -> bool:
    return moe.available(x)


def reference_greedy_state(logits: Tensor, positions: Tensor, max_position: int) -> Tensor:
    """[2, B] int64: each row's argmax over logits [B, V], and positions [B] plus one, at most max_position."""
    return torch.stack([logits.argmax(dim=-1), (positions + 1).clamp(max=max_position)])


if triton is not None:

    @triton.jit
    def _greedy_state_kernel(logits_ptr, positions_ptr, out_ptr, vocab, stride_logits, batch, max_position,
                             BLOCK_V: tl.constexpr, PDL: tl.constexpr = False):
        """A program per row: out[0, row] = the first index of its largest logit (its first NaN if any: each
        lane keeps the largest value it has seen and its first index, then the lanes agree on the largest
        value's smallest index), out[1, row] = min(position + 1, max_position)."""
        pdl_release(PDL)
        row = tl.program_id(0).to(tl.int64)
        position = tl.load(positions_ptr + row)  # a step input: no kernel of the step writes it
        pdl_wait(PDL)
        offs = tl.arange(0, BLOCK_V)
        best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        best_index = tl.full((BLOCK_V,), _NO_INDEX, dtype=tl.int32)
        first_nan = tl.full((BLOCK_V,), _NO_INDEX, dtype=tl.int32)
        for start in range(0, vocab, BLOCK_V):
            index = start + offs
            valid = index < vocab
            x = tl.load(logits_ptr + row * stride_logits + index, mask=valid, other=float("-inf")).to(tl.float32)
            first_nan = tl.minimum(first_nan, tl.where(x != x, index, _NO_INDEX))
            # strictly larger, or the lane's first valid value (a row of -inf still has an argmax: 0)
            take = valid & ((x > best) | (best_index == _NO_INDEX))
            best = tl.where(take, x, best)
            best_index = tl.where(take, index, best_index)
        largest = tl.max(best, axis=0)
        argmax = tl.min(tl.where(best == largest, best_index, _NO_INDEX), axis=0)
        nan = tl.min(first_nan, axis=0)
        tl.store(out_ptr + row, tl.where(nan < _NO_INDEX, nan, argmax).to(tl.int64))
        tl.store(out_ptr + batch + row, tl.minimum(position + 1, max_position).to(tl.int64))


def greedy_state(logits: Tensor, positions: Tensor, max_position: int) -> Tensor:
    """reference_greedy_state for logits [B, V] and int64 positions [B]: one kernel on a GPU (launched with
    PDL where active), torch elsewhere."""
    if logits.dim() != 2 or positions.shape != logits.shape[:1] or positions.dtype != torch.int64:
        raise ValueError(f"logits [B, V] and int64 positions [B] expected, got {tuple(logits.shape)} and "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if not available(logits) or logits.shape[1] == 0:
        return reference_greedy_state(logits, positions, max_position)
    if pdl.compiled_launch(logits) and _fallback_registered():
        return torch.ops.gpt_fast_mixtral.greedy_state(logits, positions, max_position)
    return _greedy_state(logits, positions, max_position)


@torch.compiler.assume_constant_result  # run while torch.compile traces, not traced
def _fallback_registered() -> bool:
    """The op comes last in a decode step: its Inductor lowering is registered before Inductor meets it
    (pdl.register_inductor_fallback says why)."""
    pdl.register_inductor_fallback(torch.ops.gpt_fast_mixtral.greedy_state.default)
    return True


def _greedy_state(logits: Tensor, positions: Tensor, max_position: int) -> Tensor:
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(2, batch, dtype=torch.int64, device=logits.device)
    if batch:
        use_pdl = pdl.active(logits)
        _greedy_state_kernel[(batch,)](logits, positions.contiguous(), out, vocab, logits.stride(0), batch,
                                       max_position, BLOCK_V=min(BLOCK, triton.next_power_of_2(vocab)), PDL=use_pdl,
                                       num_warps=16, **pdl.launch_options(use_pdl))
    return out


@torch.library.custom_op("gpt_fast_mixtral::greedy_state", mutates_args=())
def _greedy_state_op(logits: Tensor, positions: Tensor, max_position: int) -> Tensor:
    """greedy_state launched by compiled code (kernels.pdl)."""
    return _greedy_state(logits, positions, max_position)


@_greedy_state_op.register_fake
def _(logits: Tensor, positions: Tensor, max_position: int) -> Tensor:
    return positions.new_empty(2, logits.shape[0])
