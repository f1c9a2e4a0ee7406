"""Session 35 archive, not in the package: torch.compile (2.11) of the Mixtral decode step with this op after the
output head never finished (Inductor stringifying nested IR, ir.py __str__, for minutes; h200_s35_argmax_kernel_compile.log).

A decode step's greedy tokens: the argmax of each row's logits in one kernel launched with PDL.

After the output head, a compiled decode step ran Inductor's argmax: one program looping over the
vocabulary, launched the plain way, i.e. after the head had finished (~7 us on an H200 for Mixtral's 32000
logits). `argmax` is one kernel launched with programmatic dependent launch (kernels.pdl): its programs
are resident before the head's end and each loads its row in wide passes (two for Mixtral).
`torch.argmax` is the reference it is tested against.
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


if triton is not None:

    @triton.jit
    def _argmax_kernel(logits_ptr, out_ptr, vocab, stride_logits, BLOCK_V: tl.constexpr, PDL: tl.constexpr = False):
        """Program per row: the first index of its largest logit. Each lane keeps the largest value it has
        seen and its first index, then the lanes agree on the largest value's smallest index (torch.argmax's
        first occurrence). NaNs are tracked apart: the first one wins, as in torch.argmax."""
        pdl_release(PDL)
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
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


def argmax(logits: Tensor) -> Tensor:
    """logits.argmax(dim=-1) of logits [B, V]: on a GPU one kernel (PDL where active), else torch's."""
    if not available(logits):
        return logits.argmax(dim=-1)
    if pdl.compiled_launch(logits):
        return torch.ops.gpt_fast_mixtral.argmax(logits)
    return _argmax(logits)


def _argmax(logits: Tensor) -> Tensor:
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        use_pdl = pdl.active(logits)
        _argmax_kernel[(batch,)](logits, out, vocab, logits.stride(0),
                                 BLOCK_V=min(BLOCK, triton.next_power_of_2(vocab)), PDL=use_pdl, num_warps=16,
                                 **pdl.launch_options(use_pdl))
    return out


@torch.library.custom_op("gpt_fast_mixtral::argmax", mutates_args=())
def _argmax_op(logits: Tensor) -> Tensor:
    """argmax launched by compiled code (kernels.pdl)."""
    return _argmax(logits)


@_argmax_op.register_fake
def _(logits: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
