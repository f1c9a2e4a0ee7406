"""Session 13: one-token int8 GEMV variants at wqkv / wo shapes (one H200), and their sm_90 SASS sizes on a CPU."""
import sys, os
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels import linear
from gpt_fast_mixtral.kernels.moe import dequant


@triton.jit
def gemv_var(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             STAGES: tl.constexpr, DEFER: tl.constexpr):
    n_block = tl.program_id(0)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    scales = tl.load(s_ptr + offs_n).to(tl.float32)
    if DEFER:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k).to(tl.float32)
            w = dequant(tl.load(w_rows + offs_k[None, :]), tl.float32, True)
            acc2 += w * x[None, :]
        acc = tl.sum(acc2, axis=1)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k).to(tl.float32)
            w = dequant(tl.load(w_rows + offs_k[None, :]), tl.float32, True)
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + offs_n, (acc * scales).to(y_ptr.dtype.element_ty))


VARIANTS = [(bn, bk, st, d, xt, wp) for bn, bk in ((8, 512), (4, 1024), (2, 2048), (16, 256), (4, 512))
            for st in (1, 3) for d in (False, True) for xt in ("bf16", "fp32") for wp in (4,)]


def sass_sizes():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import re, subprocess
    from test_kernels_cpu import compile_for_hopper
    bin_ = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    for bn, bk, st, d, xt, wp in VARIANTS:
        c = compile_for_hopper(gemv_var, [f"*{xt}", "*i8", "*bf16", "*bf16", "i32", "i32", "i32"],
                               dict(BLOCK_N=bn, BLOCK_K=bk, STAGES=st, DEFER=d), num_warps=wp, num_stages=1)
        open("/tmp/v.cubin", "wb").write(c.asm["cubin"])
        sass = subprocess.run([bin_ + "/nvdisasm", "-c", "/tmp/v.cubin"], capture_output=True, text=True).stdout
        all_lines = sass.splitlines()
        lines = [l for l in all_lines if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
        # loop bodies: instructions between a label and a later branch back to it
        label_pos, count, loops = {}, 0, []
        for l in all_lines:
            m = re.match(r"^(\.L_x_\d+):", l.strip())
            if m:
                label_pos[m.group(1)] = count
            elif re.match(r"\s+/\*[0-9a-f]{4}\*/", l):
                count += 1
                b = re.search(r"BRA `\((\.L_x_\d+)\)", l)
                if b and b.group(1) in label_pos:
                    loops.append(count - label_pos[b.group(1)])
        # the main loop: from the last label before the backward branch to it
        idx = [i for i, l in enumerate(lines) if "BRA" in l]
        regs = re.search(r"REG:(\d+)", subprocess.run([bin_ + "/cuobjdump", "--dump-resource-usage", "/tmp/v.cubin"],
                                                      capture_output=True, text=True).stdout).group(1)
        print(f"{bn}x{bk} st{st} defer={d:d} x={xt}: {len(lines)} instr, loops {loops}, regs {regs}, weights/thread/iter {bn*bk//(32*wp)}")


def bench():
    from graph_timing import graph_replay_us
    g = torch.Generator(device="cuda").manual_seed(0)
    copies = 8
    for name, (n, k) in {"wqkv": (6144, 4096), "wo": (4096, 4096), "wqkv_tp2": (3072, 4096), "wo_tp2": (4096, 2048)}.items():
        ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=g) for _ in range(copies)]
        s = torch.rand(n, device="cuda", generator=g).bfloat16() * 1e-2
        x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
        x32 = x.float()
        ref = linear.reference_int8_linear(x, ws[0], s)
        us = graph_replay_us(lambda: [linear.int8_linear(x, ws[i], s) for i in range(copies)]) / copies
        print(f"{name:9} package            {us:6.2f} us {n * k / us / 1e6:5.2f} TB/s", flush=True)
        for bn, bk, st, d, xt, wp in VARIANTS:
            if k % bk or n % bn:
                continue
            xx = x32 if xt == "fp32" else x
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            run = lambda w: gemv_var[(n // bn,)](xx, w, s, y, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk, STAGES=st,
                                                 DEFER=d, num_warps=wp)
            run(ws[0])
            err = ((y.float() - ref).norm() / ref.norm()).item()
            us = graph_replay_us(lambda: [run(ws[i]) for i in range(copies)]) / copies
            print(f"{name:9} {bn}x{bk} st{st} defer={d:d} x={xt}: {us:6.2f} us {n * k / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)


if __name__ == "__main__":
    sass_sizes() if sys.argv[1:] == ["sass"] else bench()
