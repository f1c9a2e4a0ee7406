"""L2 prefetch mechanisms, measured: a prefetch kernel (512 programs) then the int8 wo GEMV, 32 layers of
weights rotated in one CUDA graph (cold L2), against a 1-program no-op kernel then the GEMV."""
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels.linear import int8_linear

@triton.jit
def pf_kernel(w_ptr, nbytes, out_ptr, MODE: tl.constexpr, CHUNK: tl.constexpr, LANES: tl.constexpr):
    part = tl.program_id(0); parts = tl.num_programs(0)
    if MODE == 0:
        tl.store(out_ptr + part, 0)
    elif MODE == 1:  # bulk
        share = tl.cdiv(tl.cdiv(nbytes, parts * LANES), CHUNK) * CHUNK
        start = (part * LANES + tl.arange(0, LANES)).to(tl.int64) * share
        size = tl.minimum(share, nbytes - start).to(tl.int32)
        address = (w_ptr.to(tl.pointer_type(tl.int8)) + start).to(tl.int64)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)
    elif MODE == 2 or MODE == 3:  # per-line prefetch; CHUNK = lines per lane
        per_prog = tl.cdiv(nbytes, parts)
        base = part.to(tl.int64) * per_prog
        for i in tl.static_range(CHUNK):
            off = base + (i * LANES + tl.arange(0, LANES)).to(tl.int64) * 128
            ok = (off < base + per_prog) & (off < nbytes)
            address = (w_ptr.to(tl.pointer_type(tl.int8)) + off).to(tl.int64)
            if MODE == 2:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                    "=r,l,r", [address, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0; }",
                    "=r,l,r", [address, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:  # MODE 4: real loads, 16 B per lane per step, summed
        per_prog = tl.cdiv(nbytes, parts * 16) * 16
        base = part.to(tl.int64) * per_prog
        acc = tl.zeros((LANES * 16,), dtype=tl.int32)
        for s0 in range(0, per_prog, LANES * 16):
            off = base + s0 + tl.arange(0, LANES * 16)
            acc += tl.load(w_ptr + off, mask=off < nbytes, other=0).to(tl.int32)
        tl.store(out_ptr + part, tl.sum(acc, axis=0))

dev = "cuda"
L = 32
ws = [torch.randint(-127, 127, (4096, 4096), dtype=torch.int8, device=dev) for _ in range(L)]
ss = [torch.rand(4096, device=dev, dtype=torch.bfloat16) for _ in range(L)]
x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
out = torch.zeros(4096, dtype=torch.int32, device=dev)
nb = 4096 * 4096

def variant(mode, chunk, progs, gemv=True):
    def step():
        for i in range(L):
            pf_kernel[(progs if mode else 1,)](ws[i], nb, out, MODE=mode, CHUNK=chunk, LANES=128, num_warps=4)
            if gemv:
                int8_linear(x, ws[i], ss[i])
    step(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / L)
    times.sort()
    return times[len(times) // 2]

rows = []
for name, mode, chunk, progs in [("none", 0, 1, 1), ("bulk4k_512", 1, 4096, 512), ("bulk256_512", 1, 256, 512),
                                 ("bulk32k_512", 1, 32768, 512), ("bulk4k_132", 1, 4096, 132),
                                 ("line_512", 2, 2, 512), ("line_evl_512", 3, 2, 512), ("line_132", 2, 8, 132),
                                 ("load_512", 4, 1, 512), ("load_132", 4, 1, 132)]:
    try:
        both = variant(mode, chunk, progs)
        alone = variant(mode, chunk, progs, gemv=False)
        rows.append((name, both, alone))
        print(f"{name:14} pf+gemv {both:7.2f} us/layer   pf alone {alone:7.2f}", flush=True)
    except Exception as e:
        print(name, "failed", repr(e)[:300], flush=True)
