"""Session 33 micro (results/h200_s33_grid_barrier_micro.log): what a grid-wide barrier costs inside one
persistent Triton kernel on this GPU, against one kernel launch per phase in a CUDA graph (plain, and PDL: release first, wait, then read).
Each phase reads MB megabytes (int8, spread evenly over the programs, 4 rotating 256 MB regions so L2 never
holds them) and ends with the barrier / kernel boundary. Prints us per phase and the read rate."""
import sys, statistics
import torch, triton, triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

@triton.jit
def _read(base, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.int32)
    for off in range(0, n, BLOCK):
        acc += tl.load(base + off + tl.arange(0, BLOCK)).to(tl.int32)
    return tl.sum(acc, axis=0)

@triton.jit
def persistent_kernel(buf, out, cnt, per_prog, region, PHASES: tl.constexpr, BLOCK: tl.constexpr, SPIN: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = 0
    for p in range(PHASES):
        base = buf + (p % 4).to(tl.int64) * region + pid.to(tl.int64) * per_prog
        total += _read(base, per_prog, BLOCK)
        tl.debug_barrier()
        tl.atomic_add(cnt, 1, sem="release", scope="gpu")
        target = (p + 1) * nprog
        if SPIN == 0:
            c = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
            while c < target:
                c = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
        else:
            c = tl.load(cnt, volatile=True)
            while c < target:
                c = tl.load(cnt, volatile=True)
            tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
    tl.store(out + pid, total)

@triton.jit
def phase_kernel(buf, out, per_prog, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    total = _read(buf + pid.to(tl.int64) * per_prog, per_prog, BLOCK)
    tl.store(out + pid, total)

def graph_time(fn, reps=20):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)

def main():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    region = 256 << 20
    buf = torch.randint(-100, 100, (4 * region,), dtype=torch.int8, device=dev)
    out = torch.zeros(sms * 16, dtype=torch.int32, device=dev)
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    PH = 64
    BLOCK = 4096
    rows = []
    for mb in (0, 1, 4, 16, 64):
        for per_sm in (2, 4):
            nprog = sms * per_sm
            per_prog = (mb << 20) // nprog // BLOCK * BLOCK
            for spin in (0, 1):
                def fn():
                    cnt.zero_()
                    persistent_kernel[(nprog,)](buf, out, cnt, per_prog, region, PHASES=PH, BLOCK=BLOCK, SPIN=spin, num_warps=4)
                t = graph_time(fn) / PH
                rows.append((f"persistent spin={spin}", mb, nprog, t, per_prog * nprog / t / 1e6))
            for pdl in (False, True):
                def fn():
                    for p in range(PH):
                        phase_kernel[(nprog,)](buf[(p % 4) * region:], out, per_prog, PDL=pdl, BLOCK=BLOCK, num_warps=4,
                                               **({"launch_pdl": True} if pdl else {}))
                t = graph_time(fn) / PH
                rows.append((f"launches pdl={int(pdl)}", mb, nprog, t, per_prog * nprog / t / 1e6))
            print(*(f"{r[0]:22s} {r[1]:3d} MB {r[2]:5d} progs {r[3]:7.2f} us/phase {r[4]:6.2f} TB/s" for r in rows[-4:]), sep="\n", flush=True)

main()
