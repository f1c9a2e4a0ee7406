"""Session 14: does a CUDA-graph capture keep programmatic dependent launch (PDL) edges? A primary kernel
(8 programs, releasing its dependents first thing, then spinning 5 us) and a dependent launched with
launch_pdl (512 programs, a globaltimer stamp before and after gdc_wait). Eager and captured, with and
without launch_pdl: when the dependent's first stamp comes before the primary's end, they overlapped."""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def primary(stamp_ptr, ns, RELEASE: tl.constexpr):
    if RELEASE:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    t0 = now(pid)
    t = t0
    while t - t0 < ns:
        t = now(pid)
    tl.atomic_max(stamp_ptr + 2, now(pid))


@triton.jit
def dependent(stamp_ptr, WAIT: tl.constexpr):
    pid = tl.program_id(0)
    tl.atomic_min(stamp_ptr + 0, now(pid))
    if WAIT:
        gdc_wait()
    tl.atomic_min(stamp_ptr + 1, now(pid))


BIG = (1 << 62)
stamps = torch.tensor([BIG, BIG, 0], dtype=torch.int64, device="cuda")
init = stamps.clone()


def step(pdl):
    stamps.copy_(init)
    primary[(8,)](stamps, 5000, RELEASE=pdl, num_warps=4)
    dependent[(512,)](stamps, WAIT=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))


def report(name):
    first, after_wait, primary_end = stamps.tolist()
    print(f"{name:22} dependent first stamp {first - primary_end:+7d} ns, after its wait {after_wait - primary_end:+7d} ns "
          "(relative to the primary's end)", flush=True)


for pdl in (False, True):
    for _ in range(3):
        step(pdl)
    torch.cuda.synchronize()
    report(f"eager pdl={pdl}")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(pdl)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    report(f"graph pdl={pdl}")
