"""Programmatic dependent launch (PDL) for the one-token decode kernels on Hopper and newer GPUs.

A decode step is a chain of short kernels, and each one's launch, ramp-up and tail leave the GPU's
memory idle: a kernel normally starts only when the one before has finished. Launched with PDL, a
kernel's programs are scheduled as soon as every program of the kernel before has called `pdl_release`
(gdc_launch_dependents), and they block in `pdl_wait` (gdc_wait) until that kernel has finished and its
writes are visible. Before the wait a program may read only what no kernel still running writes: the
weights, which the matrix-vector kernels ask L2 for (`prefetch_l2_rows`) and whose first tile they load
into registers, so a weight read starts during the previous kernel's tail instead of after it.

The contract every PDL kernel here keeps:
  - it calls `pdl_release` first thing, so the next kernel can be scheduled, except the expert gate_up
    kernel, which releases after its wait: the down kernel after it reads the expert ids before its
    own wait, and the ids are then final (the router, two kernels back, has finished);
  - it writes nothing and reads nothing but weights (and those ids) before `pdl_wait`.
A kernel launched the plain way between two PDL kernels (Inductor's, NCCL's) waits for the full
completion of the one before it, as in any stream, so mixing is safe.

Under torch.compile, Inductor launches a user-defined Triton kernel through its own launcher, which
has no PDL in torch 2.11; the kernels' launch functions then go through custom ops (`compiled_launch`),
whose implementation Inductor calls and which launch as eager code does. CUDA-graph capture keeps the
programmatic edges (benchmarks/results/pdl_graph_check_session14.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Inline PTX runs on NVIDIA GPUs only: not in Triton's CPU interpreter, not on ROCm.
INLINE_PTX = triton is not None and os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None

gdc_wait = gdc_launch_dependents = None
if triton is not None:
    with contextlib.suppress(ImportError):  # a Triton without PDL: every kernel is launched the plain way
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Off: every decode kernel is launched the plain way and the MoE block's end is left to the compiled step
# (scripts/benchmark.py --no-pdl compares).
ENABLED = True


_MAJORS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # a constant to torch.compile's tracing, not a traced call
def _major(index: int) -> int:
    if index not in _MAJORS:
        _MAJORS[index] = torch.cuda.get_device_capability(index)[0]
    return _MAJORS[index]


def active(x: Tensor) -> bool:
    """Whether the kernels working on x launch with PDL: on, a CUDA tensor of an sm_90+ GPU, inline PTX
    (not Triton's interpreter, not ROCm) and a Triton that has it."""
    return (ENABLED and gdc_wait is not None and INLINE_PTX and x.is_cuda
            and _major(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 9)


def compiled_launch(x: Tensor) -> bool:
    """Whether to launch through the kernel's custom op: inside torch.compile's tracing, with PDL active."""
    return torch.compiler.is_compiling() and active(x)


def register_inductor_fallback(op) -> None:
    """Give Inductor the fallback lowering of a custom op (OpOverload) before it meets the op in a graph,
    as it would make on meeting it. Inductor of torch 2.11 formats the op's arguments for a log line when it
    first meets it, whether logged or not: for an op at the end of a decode step that string spells out the
    whole step's IR, each custom op's inputs again through every path to them, and took longer than any
    compile (benchmarks/NOTES.md, session 36). Newer versions format it lazily. Does nothing where the
    private lowering API is missing."""
    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return
    if op not in lowerings:
        make_fallback(op, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True)),
                      warn=False)


def launch_options(use: bool) -> dict:
    """Extra launch keywords: `launch_pdl` only when used on a GPU (older Tritons and the interpreter lack
    it; the interpreter checks run the PDL kernels' code with the GPU instructions left out)."""
    return {"launch_pdl": True} if use and INLINE_PTX else {}


def config_values(config) -> list[int]:
    """A kernel config dataclass (int and bool fields) as a custom op's int[] argument."""
    return [int(getattr(config, field.name)) for field in dataclasses.fields(config)]


def config_from_values(cls, values: list[int]):
    """config_values' inverse."""
    fields = dataclasses.fields(cls)
    return cls(**{field.name: type(field.default)(value) for field, value in zip(fields, values, strict=True)})


if triton is not None:
    # INLINE_PTX for kernels (import it by name: Inductor compiles user kernels from their source and resolves
    # plain global names only)
    GPU_PTX = tl.constexpr(INLINE_PTX)

    @triton.jit
    def pdl_release(PDL: tl.constexpr):
        """Let the next kernel's programs be scheduled (they block in their own `pdl_wait`)."""
        if PDL and GPU_PTX:
            gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Block until the kernel before has finished and its writes are visible."""
        if PDL and GPU_PTX:
            gdc_wait()

    @triton.jit
    def prefetch_l2_rows(row_ptrs, mask, nbytes, LINES: tl.constexpr):
        """Ask L2 for nbytes from each of row_ptrs [R] (byte pointers; rows where mask is False skipped),
        a 128-byte line per element, LINES lines of each row per instruction round. The loads that
        follow then find the lines in L2 or on their way. A no-op in Triton's interpreter."""
        if GPU_PTX:
            row_ptrs = row_ptrs.to(tl.pointer_type(tl.int8), bitcast=True)
            for start in range(0, nbytes, LINES * 128):
                cols = start + tl.arange(0, LINES) * 128
                ok = mask[:, None] & (cols < nbytes)[None, :]
                address = (row_ptrs[:, None] + cols[None, :]).to(tl.int64)
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; } mov.b32 $0, 0;", "=r,l,r",
                    [address, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
