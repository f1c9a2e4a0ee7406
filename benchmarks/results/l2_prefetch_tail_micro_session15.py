"""Session 15: can a short, nearly idle kernel (the decode attention: 8 programs, ~4.6 us) hide the next
GEMV's weight read by asking L2 for it from extra programs of its own (no PDL)? One CUDA graph, 32 layers
(weights rotate: never in L2 at the start). Variants of the primary: spin only; + P programs issuing
prefetch.global.L2 per 128-byte line; + P programs issuing cp.async.bulk.prefetch.L2 of CHUNK bytes.
The GEMV is the package's int8_linear (wo shape). Prints us per layer."""
import sys
import torch
import triton
import triton.language as tl

from gpt_fast_mixtral.kernels.linear import int8_linear

N = K = 4096
L = 32


@triton.jit
def now(dummy):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dummy], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def primary(out_ptr, ns, w_ptr, nbytes, SPIN_PROGRAMS: tl.constexpr, MODE: tl.constexpr, CHUNK: tl.constexpr,
            LINES: tl.constexpr):
    pid = tl.program_id(0)
    if pid < SPIN_PROGRAMS:
        t0 = now(pid)
        t = t0
        while t - t0 < ns:
            t = now(pid)
        tl.store(out_ptr + pid, t - t0)
    else:
        p = pid - SPIN_PROGRAMS
        nprog = tl.num_programs(0) - SPIN_PROGRAMS
        per = tl.cdiv(tl.cdiv(nbytes, nprog), CHUNK) * CHUNK
        start = p.to(tl.int64) * per
        if MODE == 1:  # one prefetch.global.L2 per 128-byte line, LINES lines per instruction round
            for off in range(0, per, LINES * 128):
                o = start + off + tl.arange(0, LINES).to(tl.int64) * 128
                address = (w_ptr + o).to(tl.int64)
                tl.inline_asm_elementwise("{ .reg .pred p; setp.lt.s64 p, $2, $3; @p prefetch.global.L2 [$1]; } mov.b32 $0, 0;",
                                          "=r,l,l,l", [address, o, tl.full(o.shape, 0, tl.int64) + nbytes],
                                          dtype=tl.int32, is_pure=False, pack=1)
        else:  # cp.async.bulk.prefetch.L2 of CHUNK bytes, one per thread-element
            nchunk = per // CHUNK
            for c0 in range(0, nchunk, 128):
                c = c0 + tl.arange(0, 128)
                o = start + c.to(tl.int64) * CHUNK
                ok = (c < nchunk) & (o < nbytes)
                address = (w_ptr + o).to(tl.int64)
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; } mov.b32 $0, 0;",
                    "=r,l,r,r", [address, ok.to(tl.int32), tl.full(c.shape, CHUNK, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(L)]
ss = [torch.rand(N, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
spins = torch.empty(256, dtype=torch.int64, device="cuda")


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


def chain(spin_ns=4600, gemv_on=True, mode=0, programs=0, chunk=16384, same=False, pf_next=True):
    def step():
        for i in range(L):
            w = ws[0] if same else ws[i]
            if spin_ns is not None:
                primary[(8 + (programs if mode else 0),)](spins, spin_ns, w, w.numel(), SPIN_PROGRAMS=8, MODE=mode,
                                                         CHUNK=chunk, LINES=512, num_warps=4)
            if gemv_on:
                int8_linear(x, w, ss[i])
    return step


rows = [("spin alone", chain(gemv_on=False)),
        ("gemv alone", chain(spin_ns=None)),
        ("gemv alone, same weight (L2)", chain(spin_ns=None, same=True)),
        ("spin + gemv", chain()),
        ("spin + gemv same weight", chain(same=True)),
        ("spin+lines P8 + gemv", chain(mode=1, programs=8)),
        ("spin+lines P32 + gemv", chain(mode=1, programs=32)),
        ("spin+lines P124 + gemv", chain(mode=1, programs=124)),
        ("spin+bulk16K P8 + gemv", chain(mode=2, programs=8)),
        ("spin+bulk16K P32 + gemv", chain(mode=2, programs=32)),
        ("spin+bulk64K P8 + gemv", chain(mode=2, programs=8, chunk=65536)),
        ("spin+bulk4K P32 + gemv", chain(mode=2, programs=32, chunk=4096)),
        ("spin+bulk16K P32 alone", chain(mode=2, programs=32, gemv_on=False)),
        ("spin+lines P32 alone", chain(mode=1, programs=32, gemv_on=False)),
        ("spin 1us+bulk16K P32 + gemv", chain(spin_ns=1000, mode=2, programs=32)),
        ("spin 1us + gemv", chain(spin_ns=1000)),
        ]
for rep in range(2):
    for name, step in rows:
        print(f"{name:32} {timed(step):7.2f} us/layer", flush=True)
