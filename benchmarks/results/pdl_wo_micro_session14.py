"""Session 14: what PDL could give the int8 wo GEMV behind a short, nearly idle kernel (the decode attention
runs 8 programs for ~4.6 us at short context). One CUDA graph of 32 layers: a 'primary' (8 programs
spinning 4.6 us, releasing its dependents first thing when PDL is on) then wo's GEMV (8 x 512 tiles, 3
stages, deferred sums, as the package's). PDL: the GEMV is launched with launch_pdl and waits (gdc_wait)
before reading x; PREFETCH 1: before that wait each program asks L2 for its whole weight tile
(prefetch.global.L2); 2: also loads its first tile into registers. Prints us per layer."""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from gpt_fast_mixtral.kernels.linear import int8_linear
from gpt_fast_mixtral.kernels.moe import dequant

N = K = 4096
L = 32


@triton.jit
def now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def spin(out_ptr, ns, RELEASE: tl.constexpr):
    if RELEASE:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    t0 = now(pid)
    t = t0
    while t - t0 < ns:
        t = now(pid)
    tl.store(out_ptr + pid, t - t0)


@triton.jit
def gemv(x_ptr, w_ptr, s_ptr, y_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    if PREFETCH >= 1:
        LINES: tl.constexpr = K // 128
        lines = tl.arange(0, BLOCK_N * LINES)
        address = (w_ptr + (pid * BLOCK_N + lines // LINES).to(tl.int64) * K + (lines % LINES) * 128).to(tl.int64)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.b32 $0, 0;", "=r,l", [address], dtype=tl.int32,
                                  is_pure=False, pack=1)
    scales = tl.load(s_ptr + offs_n).to(tl.float32)
    products = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    start = 0
    if PREFETCH == 2:
        w_first = tl.load(w_rows + tl.arange(0, BLOCK_K)[None, :])
    if PDL:
        gdc_wait()
    if PREFETCH == 2:
        x = tl.load(x_ptr + tl.arange(0, BLOCK_K)).to(tl.float32)
        products += dequant(w_first, tl.float32, True) * x[None, :]
        start = BLOCK_K
    for k0 in tl.range(start, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k).to(tl.float32)
        products += dequant(tl.load(w_rows + offs_k[None, :]), tl.float32, True) * x[None, :]
    tl.store(y_ptr + offs_n, (tl.sum(products, axis=1) * scales).to(y_ptr.dtype.element_ty))


ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(L)]
ss = [torch.rand(N, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
y = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
spins = torch.empty(8, dtype=torch.int64, device="cuda")
reference = int8_linear(x, ws[0], ss[0])
gemv[(N // 8,)](x, ws[0], ss[0], y, K=K, BLOCK_N=8, BLOCK_K=512, STAGES=3, PDL=False, PREFETCH=2, num_warps=4)
print("max |gemv - package|", (y.float() - reference.float()).abs().max().item(), flush=True)


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


def chain(primary=True, gemv_on=True, pdl=False, prefetch=0, package=False):
    def step():
        for i in range(L):
            if primary:
                spin[(8,)](spins, 4600, RELEASE=pdl, num_warps=4)
            if not gemv_on:
                continue
            if package:
                int8_linear(x, ws[i], ss[i])
            else:
                gemv[(N // 8,)](x, ws[i], ss[i], y, K=K, BLOCK_N=8, BLOCK_K=512, STAGES=3, PDL=pdl, PREFETCH=prefetch,
                                num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return step


rows = [("spin alone", chain(gemv_on=False)), ("gemv alone", chain(primary=False)),
        ("package wo alone", chain(primary=False, package=True)),
        ("spin + package wo", chain(package=True)), ("spin + gemv", chain()),
        ("pdl, wait first", chain(pdl=True)), ("pdl + L2 prefetch", chain(pdl=True, prefetch=1)),
        ("pdl + L2 + first tile", chain(pdl=True, prefetch=2)), ("no pdl, L2 + first tile", chain(prefetch=2))]
for rep in range(2):
    for name, step in rows:
        print(f"{name:26} {timed(step):7.2f} us/layer", flush=True)
