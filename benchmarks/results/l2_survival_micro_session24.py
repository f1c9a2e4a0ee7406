"""Does a weight prefetched into L2 with evict_last survive ~377 MB of streamed loads? Times an int8-sized
read of 16.8 MB (wo) after: nothing (cold), a prefetch (hot), prefetch + stream with various L2 policies."""
import statistics, torch, triton, triton.language as tl
from torch.profiler import profile, ProfilerActivity

@triton.jit
def prefetch_kernel(w_ptr, nbytes, POL: tl.constexpr, BLOCK: tl.constexpr):
    lines = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (lines.to(tl.int64) * 128 < nbytes).to(tl.int32)
    addr = (w_ptr.to(tl.pointer_type(tl.int8), bitcast=True) + lines.to(tl.int64) * 128).to(tl.int64)
    if POL == 1:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; } mov.b32 $0, 0;",
                                  "=r,l,r", [addr, ok], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; } mov.b32 $0, 0;",
                                  "=r,l,r", [addr, ok], dtype=tl.int32, is_pure=False, pack=1)

@triton.jit
def read_kernel(x_ptr, out_ptr, n, POL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    if POL == 1:
        v = tl.load(x_ptr + offs, mask=m, other=0, eviction_policy="evict_first")
    elif POL == 2:
        v = tl.load(x_ptr + offs, mask=m, other=0, eviction_policy="evict_last")
    else:
        v = tl.load(x_ptr + offs, mask=m, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(v, axis=0))

@triton.jit
def discard_kernel(w_ptr, nbytes, BLOCK: tl.constexpr):
    lines = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (lines.to(tl.int64) * 128 < nbytes).to(tl.int32)
    addr = (w_ptr.to(tl.pointer_type(tl.int8), bitcast=True) + lines.to(tl.int64) * 128).to(tl.int64)
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p discard.global.L2 [$1], 128; } mov.b32 $0, 0;",
                              "=r,l,r", [addr, ok], dtype=tl.int32, is_pure=False, pack=1)

dev = "cuda"
print("L2", torch.cuda.get_device_properties(0).L2_cache_size / 2**20, "MiB")
L = 32
WO = 4096 * 4096
wos = [torch.randint(-100, 100, (WO // 4,), dtype=torch.int32, device=dev) for _ in range(L)]
STREAM = 377 * 2**20 // 4
big = torch.randint(-100, 100, (STREAM * 5,), dtype=torch.int32, device=dev)
out = torch.empty(1 << 16, dtype=torch.int32, device=dev)

def read(x, pol, block=4096):
    read_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), POL=pol, BLOCK=block, num_warps=4)

def prefetch(x, pol, block=256):
    nbytes = x.numel() * 4
    prefetch_kernel[(triton.cdiv(nbytes // 128, block),)](x, nbytes, POL=pol, BLOCK=block, num_warps=4)

def discard(x, block=256):
    nbytes = x.numel() * 4
    discard_kernel[(triton.cdiv(nbytes // 128, block),)](x, nbytes, BLOCK=block, num_warps=4)

def run(name, pf, stream_pol, read_pol, do_stream=True, disc=False, steps=96):
    def once(l):
        w = wos[(l + 1) % L]
        if pf is not None:
            prefetch(w, pf)
        if do_stream:
            s = big[(l % 5) * STREAM:(l % 5 + 1) * STREAM]
            read(s, stream_pol, 8192)
        read(w, read_pol)
        if disc:
            discard(w)
    for l in range(2 * L):
        once(l)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for l in range(steps):
            once(l)
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "read_kernel" in e.name]
    # reads alternate stream / wo when do_stream
    durs = [e.time_range.end - e.time_range.start for e in ev]
    wo_d = durs[1::2] if do_stream else durs
    st_d = durs[0::2] if do_stream else [0]
    print(f"{name:44s} wo read {statistics.median(wo_d):6.2f} us (p10 {sorted(wo_d)[len(wo_d)//10]:.2f} p90 {sorted(wo_d)[9*len(wo_d)//10]:.2f})"
          f"  stream {statistics.median(st_d):7.1f} us", flush=True)

run("cold: no prefetch, normal stream", None, 0, 0)
run("hot: prefetch, no stream", 0, 0, 0, do_stream=False)
run("pf normal, stream normal", 0, 0, 0)
run("pf evict_last, stream normal", 1, 0, 0)
run("pf evict_last, stream evict_first", 1, 1, 0)
run("pf evict_last, stream ef, read ef", 1, 1, 1)
run("pf evict_last, stream ef, read + discard", 1, 1, 0, disc=True)
run("pf evict_last, stream normal, read + discard", 1, 0, 0, disc=True)
run("pf normal, stream evict_first", 0, 1, 0)
run("cold again", None, 0, 0)
