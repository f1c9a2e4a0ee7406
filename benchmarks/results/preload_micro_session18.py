"""Session 18: int8 one-token linears behind a short, nearly idle kernel: the package's default plan against
the whole-row preloading kernel (LinearConfig.gemv_preload_rows). One CUDA graph of 32 layers: a 'primary'
(P programs spinning T us, releasing its dependents first thing) then the linear, launched as the package
launches it (PDL on an H200). Prints us per layer (primary + linear)."""
import sys
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents
from gpt_fast_mixtral.kernels import linear

L = 32


@triton.jit
def now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def spin(out_ptr, ns):
    gdc_launch_dependents()
    pid = tl.program_id(0)
    t0 = now(pid)
    t = t0
    while t - t0 < ns:
        t = now(pid)
    tl.store(out_ptr + pid, t - t0)


def timed(step):
    step(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / L)
    times.sort()
    return times[len(times) // 2]


spins = torch.empty(64, dtype=torch.int64, device="cuda")
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
variants = [("default", linear.DEFAULT_CONFIG)] + [
    (f"preload {r} rows w{w}", linear.LinearConfig(gemv_preload_rows=r, gemv_preload_warps=w))
    for r, w in ((1, 1), (2, 1), (4, 1), (4, 2), (8, 4))]
for name_w, n, k, programs, ns in (("wo", 4096, 4096, 8, 4600), ("wqkv", 6144, 4096, 1, 2100),
                                   ("wo tp2", 4096, 2048, 4, 4000), ("wqkv tp2", 3072, 4096, 1, 1500)):
    ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(L)]
    ss = [torch.rand(n, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(L)]
    xk = x[:, :k].contiguous()
    ref = linear.reference_int8_linear(xk, ws[0], ss[0])
    print(f"== {name_w} [{n}, {k}] behind {programs} programs spinning {ns / 1000} us", flush=True)
    print(f"{'spin alone':24} {timed(lambda: [spin[(programs,)](spins, ns) for _ in range(L)]):7.2f}")
    for name, cfg in variants:
        y = linear._linear(xk, ws[0], ss[0], cfg)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        alone = timed(lambda cfg=cfg: [linear._linear(xk, ws[i], ss[i], cfg) for i in range(L)])
        both = timed(lambda cfg=cfg: [(spin[(programs,)](spins, ns), linear._linear(xk, ws[i], ss[i], cfg))
                                      for i in range(L)])
        print(f"{name:24} alone {alone:7.2f}  behind spin {both:7.2f} us   rel err {err:.1e}", flush=True)
