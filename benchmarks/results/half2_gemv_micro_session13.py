"""Session 13: one-token int8 GEMV with half2 arithmetic (int8 -> f16x2 by prmt, fma.rn.f16x2 products summed in
float16 over the K loop, float32 across threads at the end) against the package kernel. On a CPU: SASS sizes."""
import sys, os
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels import linear
from gpt_fast_mixtral.kernels.moe import int8_to_fp16, dequant


@triton.jit
def hfma2(a, b, c):
    return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def gemv_half2(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               STAGES: tl.constexpr, FLUSH: tl.constexpr, ASM: tl.constexpr):
    """x16 = x * 2**-e (float16, |x16| <= 16), xs = 2**e."""
    n_block = tl.program_id(0)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    scales = tl.load(s_ptr + offs_n).to(tl.float32) * tl.load(xs_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)
    it = 0
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.broadcast_to(tl.load(x_ptr + offs_k)[None, :], (BLOCK_N, BLOCK_K))
        w = int8_to_fp16(tl.load(w_rows + offs_k[None, :]))
        if ASM:
            part = hfma2(w, x, part)
        else:
            part = part + w * x
        if FLUSH > 0:
            it += 1
            if it % FLUSH == 0:
                acc += part.to(tl.float32)
                part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float16)
    acc += part.to(tl.float32)
    out = tl.sum(acc, axis=1) * scales
    tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty))


VARIANTS = [(bn, bk, st, fl, asm) for bn, bk in ((8, 512), (16, 256), (4, 1024)) for st in (3, 2) for fl in (0, 8)
            for asm in (True, False)]


def sass_sizes():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import re, subprocess
    from test_kernels_cpu import compile_for_hopper
    bin_ = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    for bn, bk, st, fl, asm in VARIANTS:
        c = compile_for_hopper(gemv_half2, ["*fp16", "*fp32", "*i8", "*bf16", "*bf16", "i32", "i32", "i32"],
                               dict(BLOCK_N=bn, BLOCK_K=bk, STAGES=st, FLUSH=fl, ASM=asm), num_warps=4, num_stages=1)
        open("/tmp/h.cubin", "wb").write(c.asm["cubin"])
        sass = subprocess.run([bin_ + "/nvdisasm", "-c", "/tmp/h.cubin"], capture_output=True, text=True).stdout
        label_pos, count, loops, ops = {}, 0, [], {}
        for l in sass.splitlines():
            m = re.match(r"^(\.L_x_\d+):", l.strip())
            if m:
                label_pos[m.group(1)] = count
            elif re.match(r"\s+/\*[0-9a-f]{4}\*/", l):
                count += 1
                op = re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", l).split()[0].split(".")[0]
                ops[op] = ops.get(op, 0) + 1
                b = re.search(r"BRA `\((\.L_x_\d+)\)", l)
                if b and b.group(1) in label_pos:
                    loops.append(count - label_pos[b.group(1)])
        regs = re.search(r"REG:(\d+)", subprocess.run([bin_ + "/cuobjdump", "--dump-resource-usage", "/tmp/h.cubin"],
                                                      capture_output=True, text=True).stdout).group(1)
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        print(f"{bn}x{bk} st{st} flush{fl} asm={asm:d}: {count} instr, loops {loops}, regs {regs}, "
              f"weights/thread/iter {bn * bk // 128}; {top}")


def bench():
    from graph_timing import graph_replay_us
    g = torch.Generator(device="cuda").manual_seed(0)
    copies = 8
    for name, (n, k) in {"wqkv": (6144, 4096), "wo": (4096, 4096), "wqkv_tp2": (3072, 4096), "wo_tp2": (4096, 2048)}.items():
        ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=g) for _ in range(copies)]
        s = torch.rand(n, device="cuda", generator=g).bfloat16() * 1e-2
        x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
        e = torch.ceil(torch.log2(x.float().abs().max() / 16))
        xs = (2.0 ** e).float().reshape(1)
        x16 = (x.float() / xs).half()
        ref = linear.reference_int8_linear(x, ws[0], s)
        us = graph_replay_us(lambda: [linear.int8_linear(x, ws[i], s) for i in range(copies)]) / copies
        err0 = ((linear.int8_linear(x, ws[0], s).float() - ref).norm() / ref.norm()).item()
        print(f"{name:9} package              {us:6.2f} us {n * k / us / 1e6:5.2f} TB/s err {err0:.0e}", flush=True)
        for bn, bk, st, fl, asm in VARIANTS:
            if k % bk or n % bn:
                continue
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            run = lambda w: gemv_half2[(n // bn,)](x16, xs, w, s, y, n, k, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                   STAGES=st, FLUSH=fl, ASM=asm, num_warps=4)
            try:
                run(ws[0])
            except Exception as failure:
                print(f"{name:9} {bn}x{bk} st{st} flush{fl} asm={asm:d}: failed {type(failure).__name__} {str(failure)[:150]}")
                continue
            err = ((y.float() - ref).norm() / ref.norm()).item()
            us = graph_replay_us(lambda: [run(ws[i]) for i in range(copies)]) / copies
            print(f"{name:9} {bn}x{bk} st{st} flush{fl} asm={asm:d}: {us:6.2f} us {n * k / us / 1e6:5.2f} TB/s err {err:.0e}", flush=True)


if __name__ == "__main__":
    sass_sizes() if sys.argv[1:] == ["sass"] else bench()
