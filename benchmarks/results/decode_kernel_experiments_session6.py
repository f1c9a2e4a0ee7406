"""Microbenchmark: a Mixtral int8 decode layer's weight-streaming kernels chained in one CUDA graph,
with / without programmatic dependent launch (PDL) and with / without register prefetch of the next
weight tile. Prints us per layer."""
import sys
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents

D, I, E, QKV = 4096, 14336, 8, 6144
LAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 8


@triton.jit
def deq(w):
    return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def tiny_kernel(src, dst, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    # stands for a norm / sum / router kernel: reads a row, writes a row
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sum(v * v) / n
    tl.store(dst + offs, (v * tl.rsqrt(s + 1e-5)).to(dst.dtype.element_ty), mask=m)


@triton.jit
def linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    scales = tl.load(s_ptr + offs_n).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:
        w_next = tl.load(w_rows + tl.arange(0, BLOCK_K)[None, :])
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = w_next
            nk = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + nk[None, :], mask=(nk < K)[None, :], other=0)
            x = tl.load(x_ptr + offs_k).to(tl.float32)
            acc += tl.sum(deq(w) * x[None, :], axis=1)
    else:
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k).to(tl.float32)
            w = tl.load(w_rows + offs_k[None, :])
            acc += tl.sum(deq(w) * x[None, :], axis=1)
    tl.store(y_ptr + offs_n, (acc * scales).to(y_ptr.dtype.element_ty))


@triton.jit
def gate_up_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, experts_ptr, dim, inter, PDL: tl.constexpr,
                   PREFETCH: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    slot = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    w_base = expert * inter * dim + offs_i[:, None].to(tl.int64) * dim
    gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
    up = tl.zeros((BLOCK_I,), dtype=tl.float32)
    if PREFETCH:
        d = tl.arange(0, BLOCK_D)
        n1 = tl.load(w1_ptr + w_base + d[None, :])
        n3 = tl.load(w3_ptr + w_base + d[None, :])
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            w1 = n1
            w3 = n3
            nd = d0 + BLOCK_D + tl.arange(0, BLOCK_D)
            nm = (nd < dim)[None, :]
            n1 = tl.load(w1_ptr + w_base + nd[None, :], mask=nm, other=0)
            n3 = tl.load(w3_ptr + w_base + nd[None, :], mask=nm, other=0)
            x = tl.load(x_ptr + offs_d).to(tl.float32)
            gate += tl.sum(deq(w1) * x[None, :], axis=1)
            up += tl.sum(deq(w3) * x[None, :], axis=1)
    else:
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + offs_d).to(tl.float32)
            w1 = tl.load(w1_ptr + w_base + offs_d[None, :])
            w3 = tl.load(w3_ptr + w_base + offs_d[None, :])
            gate += tl.sum(deq(w1) * x[None, :], axis=1)
            up += tl.sum(deq(w3) * x[None, :], axis=1)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot * inter + offs_i, h.to(h_ptr.dtype.element_ty))


@triton.jit
def down_kernel(h_ptr, w2_ptr, y_ptr, experts_ptr, dim, inter, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    slot = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    split = tl.program_id(2)
    split_len = inter // SPLIT
    # experts were written two kernels back: safe to read before the wait (gate_up waited first)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    w_base = expert * dim * inter + offs_o[:, None].to(tl.int64) * inter
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = split * split_len
    if PREFETCH:
        nw = tl.load(w2_ptr + w_base + (start + tl.arange(0, BLOCK_I))[None, :])
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for i0 in range(start, start + split_len, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            w = nw
            ni = i0 + BLOCK_I + tl.arange(0, BLOCK_I)
            nw = tl.load(w2_ptr + w_base + ni[None, :], mask=(ni < start + split_len)[None, :], other=0)
            h = tl.load(h_ptr + slot * inter + offs_i).to(tl.float32)
            acc += tl.sum(deq(w) * h[None, :], axis=1)
    else:
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for i0 in range(start, start + split_len, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            h = tl.load(h_ptr + slot * inter + offs_i).to(tl.float32)
            w = tl.load(w2_ptr + w_base + offs_i[None, :])
            acc += tl.sum(deq(w) * h[None, :], axis=1)
    tl.store(y_ptr + split * 2 * dim + slot * dim + offs_o, acc)


@triton.jit
def read_kernel(src, dst, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for it in range(ITERS):
        acc += tl.load(src + base + it * BLOCK + tl.arange(0, BLOCK)).to(tl.int32)
    tl.store(dst + tl.program_id(0), tl.sum(acc))


@triton.jit
def gate_up_tc(x_ptr, w1_ptr, w3_ptr, h_ptr, experts_ptr, dim, inter, BLOCK_I: tl.constexpr,
               BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    slot = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    w_base = expert * inter * dim + offs_i[:, None].to(tl.int64) * dim
    acc1 = tl.zeros((BLOCK_I, 16), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_I, 16), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + offs_d)
        xt = tl.broadcast_to(x[:, None], (BLOCK_D, 16))
        w1 = tl.load(w1_ptr + w_base + offs_d[None, :]).to(tl.bfloat16)
        w3 = tl.load(w3_ptr + w_base + offs_d[None, :]).to(tl.bfloat16)
        acc1 = tl.dot(w1, xt, acc1)
        acc3 = tl.dot(w3, xt, acc3)
    col0 = (tl.arange(0, 16) == 0)[None, :]
    gate = tl.sum(tl.where(col0, acc1, 0.0), axis=1)
    up = tl.sum(tl.where(col0, acc3, 0.0), axis=1)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot * inter + offs_i, h.to(h_ptr.dtype.element_ty))


@triton.jit
def down_tc(h_ptr, w2_ptr, y_ptr, experts_ptr, dim, inter, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr,
            BLOCK_I: tl.constexpr, PDL: tl.constexpr):
    slot = tl.program_id(0)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    split = tl.program_id(2)
    split_len = inter // SPLIT
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    w_base = expert * dim * inter + offs_o[:, None].to(tl.int64) * inter
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    acc = tl.zeros((BLOCK_O, 16), dtype=tl.float32)
    start = split * split_len
    for i0 in range(start, start + split_len, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        hv = tl.load(h_ptr + slot * inter + offs_i)
        ht = tl.broadcast_to(hv[:, None], (BLOCK_I, 16))
        w = tl.load(w2_ptr + w_base + offs_i[None, :]).to(tl.bfloat16)
        acc = tl.dot(w, ht, acc)
    col0 = (tl.arange(0, 16) == 0)[None, :]
    out = tl.sum(tl.where(col0, acc, 0.0), axis=1)
    tl.store(y_ptr + split * 2 * dim + slot * dim + offs_o, out)


@triton.jit
def gate_up_var(x_ptr, w1_ptr, w3_ptr, w13b_ptr, h_ptr, experts_ptr, dim, inter, MODE: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    # MODE 0: row layout, int sums only (no dequant math); 1: blocked layout [E, I/BI, D/BD, 2, BI, BD], full math
    # 2: blocked layout, int sums only
    slot = tl.program_id(0)
    ib = tl.program_id(1)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    w_base = expert * inter * dim + offs_i[:, None].to(tl.int64) * dim
    blk = tl.arange(0, BLOCK_I)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    b_base = expert * inter * dim * 2 + ib.to(tl.int64) * BLOCK_I * dim * 2
    gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
    up = tl.zeros((BLOCK_I,), dtype=tl.float32)
    gi = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.int32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        if MODE == 0:
            w1 = tl.load(w1_ptr + w_base + offs_d[None, :])
            w3 = tl.load(w3_ptr + w_base + offs_d[None, :])
            gi += w1.to(tl.int32) + w3.to(tl.int32)
        else:
            p = w13b_ptr + b_base + (d0 // BLOCK_D) * (2 * BLOCK_I * BLOCK_D) + blk
            w1 = tl.load(p)
            w3 = tl.load(p + BLOCK_I * BLOCK_D)
            if MODE == 2:
                gi += w1.to(tl.int32) + w3.to(tl.int32)
            else:
                x = tl.load(x_ptr + offs_d).to(tl.float32)
                gate += tl.sum(deq(w1) * x[None, :], axis=1)
                up += tl.sum(deq(w3) * x[None, :], axis=1)
    if MODE != 1:
        gate = tl.sum(gi, axis=1).to(tl.float32)
        up = gate
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot * inter + offs_i, h.to(h_ptr.dtype.element_ty))


@triton.jit
def down_var(h_ptr, w2b_ptr, y_ptr, experts_ptr, dim, inter, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr,
             BLOCK_I: tl.constexpr):
    # blocked layout [E, D/BO, I/BI, BO, BI]
    slot = tl.program_id(0)
    ob = tl.program_id(1)
    split = tl.program_id(2)
    split_len = inter // SPLIT
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    blk = tl.arange(0, BLOCK_O)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
    base = expert * dim * inter + ob.to(tl.int64) * BLOCK_O * inter
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = split * split_len
    for i0 in range(start, start + split_len, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        hv = tl.load(h_ptr + slot * inter + offs_i).to(tl.float32)
        w = tl.load(w2b_ptr + base + (i0 // BLOCK_I) * (BLOCK_O * BLOCK_I) + blk)
        acc += tl.sum(deq(w) * hv[None, :], axis=1)
    tl.store(y_ptr + split * 2 * dim + slot * dim + ob * BLOCK_O + tl.arange(0, BLOCK_O), acc)


@triton.jit
def gate_up_rows(x_ptr, w1_ptr, w3_ptr, h_ptr, experts_ptr, dim, inter, BLOCK_I: tl.constexpr, R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    slot = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_I
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    x = tl.load(x_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r0 in tl.static_range(0, BLOCK_I, R):
        rows = i0 + r0 + tl.arange(0, R)
        p = expert * inter * dim + rows[:, None].to(tl.int64) * dim + offs_d[None, :]
        w1 = tl.load(w1_ptr + p, mask=mask_d[None, :], other=0)
        w3 = tl.load(w3_ptr + p, mask=mask_d[None, :], other=0)
        g = tl.sum(deq(w1) * x[None, :], axis=1)
        u = tl.sum(deq(w3) * x[None, :], axis=1)
        tl.store(h_ptr + slot * inter + rows, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty))


@triton.jit
def down_rows(h_ptr, w2_ptr, y_ptr, experts_ptr, dim, inter, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr,
              R: tl.constexpr, BLOCK_S: tl.constexpr):
    slot = tl.program_id(0)
    o0 = tl.program_id(1) * BLOCK_O
    split = tl.program_id(2)
    split_len = inter // SPLIT
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    offs_i = split * split_len + tl.arange(0, BLOCK_S)
    mask_i = tl.arange(0, BLOCK_S) < split_len
    hv = tl.load(h_ptr + slot * inter + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    for r0 in tl.static_range(0, BLOCK_O, R):
        rows = o0 + r0 + tl.arange(0, R)
        w = tl.load(w2_ptr + expert * dim * inter + rows[:, None].to(tl.int64) * inter + offs_i[None, :],
                    mask=mask_i[None, :], other=0)
        acc = tl.sum(deq(w) * hv[None, :], axis=1)
        tl.store(y_ptr + split * 2 * dim + slot * dim + rows, acc)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    layers = []
    for _ in range(LAYERS):
        layers.append(dict(
            wqkv=torch.randint(-127, 127, (QKV, D), dtype=torch.int8, device=dev),
            wo=torch.randint(-127, 127, (D, D), dtype=torch.int8, device=dev),
            w1=torch.randint(-127, 127, (E, I, D), dtype=torch.int8, device=dev),
            w3=torch.randint(-127, 127, (E, I, D), dtype=torch.int8, device=dev),
            w2=torch.randint(-127, 127, (E, D, I), dtype=torch.int8, device=dev),
            experts=torch.randperm(E, device=dev)[:2].to(torch.int32)))
    sq = torch.rand(QKV, device=dev, dtype=torch.bfloat16)
    so = torch.rand(D, device=dev, dtype=torch.bfloat16)
    x = torch.randn(D, device=dev, dtype=torch.bfloat16)
    xn = torch.empty_like(x)
    qkv = torch.empty(QKV, device=dev, dtype=torch.bfloat16)
    att = torch.empty(D, device=dev, dtype=torch.bfloat16)
    o = torch.empty(D, device=dev, dtype=torch.bfloat16)
    h = torch.empty(2, I, device=dev, dtype=torch.bfloat16)
    y = torch.zeros(8, 2, D, device=dev, dtype=torch.float32)
    ysum = torch.empty(D, device=dev, dtype=torch.bfloat16)

    def layer(L, pdl, pre, parts):
        kw = dict(launch_pdl=pdl)
        if "tiny" in parts:
            tiny_kernel[(1,)](x, xn, D, PDL=pdl, BLOCK=4096, num_warps=8, **kw)
        if "lin" in parts:
            linear_kernel[(QKV // 4,)](xn, L["wqkv"], sq, qkv, QKV, D, PDL=pdl, PREFETCH=pre, BLOCK_N=4,
                                        BLOCK_K=1024, num_warps=4, num_stages=1, **kw)
        if "tiny" in parts:
            tiny_kernel[(1,)](qkv, att, D, PDL=pdl, BLOCK=4096, num_warps=8, **kw)
        if "lin" in parts:
            linear_kernel[(D // 4,)](att, L["wo"], so, o, D, D, PDL=pdl, PREFETCH=pre, BLOCK_N=4, BLOCK_K=1024,
                                     num_warps=4, num_stages=1, **kw)
        if "tiny" in parts:
            tiny_kernel[(1,)](o, xn, D, PDL=pdl, BLOCK=4096, num_warps=8, **kw)
        if "moe" in parts:
            gate_up_kernel[(2, I // 8)](xn, L["w1"], L["w3"], h, L["experts"], D, I, PDL=pdl, PREFETCH=pre,
                                        BLOCK_I=8, BLOCK_D=1024, num_warps=4, **kw)
            down_kernel[(2, D // 8, 4)](h, L["w2"], y, L["experts"], D, I, PDL=pdl, PREFETCH=pre, SPLIT=4,
                                        BLOCK_O=8, BLOCK_I=512, num_warps=4, **kw)
        if "tiny" in parts:
            tiny_kernel[(1,)](y, ysum, D, PDL=pdl, BLOCK=4096, num_warps=8, **kw)

    # correctness of the prefetch variants against the plain ones
    L = layers[0]
    outs = []
    for pre in (False, True):
        layer(L, False, pre, ("tiny", "lin", "moe"))
        torch.cuda.synchronize()
        outs.append((qkv.clone(), h.clone(), y.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-2), (a - b).abs().max()

    rows = []
    # tensor-core variants vs the plain ones (correctness, then time)
    layer(L, False, False, ("moe",))
    torch.cuda.synchronize()
    h_ref, y_ref = h.clone(), y.clone()
    def timed(fn, nbytes, label):
        for _ in range(2):
            for Lx in layers:
                fn(Lx)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for Lx in layers:
                fn(Lx)
        g.replay(); torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            s0, e0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s0.record(); g.replay(); e0.record(); e0.synchronize()
            ts.append(s0.elapsed_time(e0) * 1000 / LAYERS)
        ts.sort(); us = ts[len(ts) // 2]
        print(f"{label:40} {us:8.1f} us {nbytes / us / 1e6:6.2f} TB/s", flush=True)
    buf = torch.empty(3 * 2 * I * D * LAYERS, dtype=torch.int8, device=dev)
    for j, Lx in enumerate(layers):
        Lx['i'] = j
    dst = torch.empty(1 << 20, dtype=torch.int32, device=dev)
    for blk, it, w in ((4096, 16, 4), (8192, 8, 8), (16384, 4, 8), (4096, 64, 4)):
        per = buf.numel() // LAYERS
        n = per // (blk * it)
        timed(lambda Lx, blk=blk, it=it, w=w, n=n: read_kernel[(n,)](buf[Lx['i'] * per:], dst, 0, BLOCK=blk, ITERS=it, num_warps=w),
              n * blk * it, f"read {blk}x{it} w{w}")
    timed(lambda Lx: layer(Lx, False, False, ("moe",)), 3 * 2 * I * D, "moe gemv (current)")
    timed(lambda Lx: gate_up_kernel[(2, I // 8)](xn, Lx["w1"], Lx["w3"], h, Lx["experts"], D, I, PDL=False, PREFETCH=False,
                                        BLOCK_I=8, BLOCK_D=1024, num_warps=4), 2 * 2 * I * D, "gate_up gemv (current)")
    timed(lambda Lx: down_kernel[(2, D // 8, 4)](h, Lx["w2"], y, Lx["experts"], D, I, PDL=False, PREFETCH=False, SPLIT=4,
                                        BLOCK_O=8, BLOCK_I=512, num_warps=4), 2 * I * D, "down gemv (current)")
    for Lx in layers:
        Lx["w13b"] = torch.stack([Lx["w1"], Lx["w3"]], 1).view(E, 2, I // 8, 8, D // 1024, 1024).permute(0, 2, 4, 1, 3, 5).contiguous()
    import gpt_fast_mixtral.kernels.moe as M
    rw = torch.rand(2, device=dev, dtype=torch.bfloat16)
    timed(lambda Lx: M._fused_moe_gemv(xn[None], Lx["w1"], Lx["w2"], Lx["w3"], rw[None], Lx["experts"][None].long(), (so.new_ones(E, I), so.new_ones(E, D), so.new_ones(E, I)), M.DEFAULT_CONFIG), 3 * 2 * I * D, "package _fused_moe_gemv")
    for Lx in layers:
        del Lx["w13b"]
    torch.cuda.empty_cache()
    for bi, r, w in ((8, 1, 4), (8, 2, 4), (8, 2, 8), (16, 2, 4), (16, 4, 8), (4, 1, 4), (4, 2, 4), (8, 4, 8), (32, 2, 4), (16, 1, 4)):
        gate_up_rows[(2, I // bi)](xn, L["w1"], L["w3"], h, L["experts"], D, I, BLOCK_I=bi, R=r, BLOCK_D=4096, num_warps=w)
        torch.cuda.synchronize()
        err = (h.float() - h_ref.float()).abs().max().item() / h_ref.float().abs().max().item()
        timed(lambda Lx, bi=bi, r=r, w=w: gate_up_rows[(2, I // bi)](xn, Lx["w1"], Lx["w3"], h, Lx["experts"], D, I, BLOCK_I=bi, R=r, BLOCK_D=4096, num_warps=w),
              2 * 2 * I * D, f"gate_up rows {bi}/{r} w{w} err {err:.1e}")
    h.copy_(h_ref)
    for bo, r, sp, bs, w in ((8, 1, 4, 4096, 4), (8, 2, 4, 4096, 4), (8, 1, 7, 2048, 4), (8, 2, 7, 2048, 4), (16, 2, 7, 2048, 4), (8, 1, 7, 2048, 2), (16, 4, 7, 2048, 8), (8, 1, 2, 8192, 8), (4, 1, 7, 2048, 2), (32, 2, 7, 2048, 4)):
        down_rows[(2, D // bo, sp)](h, L["w2"], y, L["experts"], D, I, SPLIT=sp, BLOCK_O=bo, R=r, BLOCK_S=bs, num_warps=w)
        torch.cuda.synchronize()
        err = (y[:sp].sum(0) - y_ref.sum(0)).abs().max().item() / y_ref.sum(0).abs().max().item()
        timed(lambda Lx, bo=bo, r=r, sp=sp, bs=bs, w=w: down_rows[(2, D // bo, sp)](h, Lx["w2"], y, Lx["experts"], D, I, SPLIT=sp, BLOCK_O=bo, R=r, BLOCK_S=bs, num_warps=w),
              2 * I * D, f"down rows {bo}/{r} split{sp} w{w} err {err:.1e}")
    return
    for bi, bd, w in ((8, 1024, 4), (8, 512, 4), (8, 512, 2), (4, 1024, 4), (4, 512, 2), (16, 512, 4), (16, 256, 4), (8, 1024, 8), (4, 2048, 8), (16, 1024, 8)):
        for Lx in layers:
            Lx["w13b"] = torch.stack([Lx["w1"], Lx["w3"]], 1).view(E, 2, I // bi, bi, D // bd, bd).permute(0, 2, 4, 1, 3, 5).contiguous()
        gate_up_var[(2, I // bi)](xn, L["w1"], L["w3"], L["w13b"], h, L["experts"], D, I, MODE=1, BLOCK_I=bi, BLOCK_D=bd, num_warps=w)
        torch.cuda.synchronize()
        err = (h.float() - h_ref.float()).abs().max().item() / h_ref.float().abs().max().item()
        timed(lambda Lx, bi=bi, bd=bd, w=w: gate_up_var[(2, I // bi)](xn, Lx["w1"], Lx["w3"], Lx["w13b"], h, Lx["experts"], D, I, MODE=1, BLOCK_I=bi, BLOCK_D=bd, num_warps=w),
              2 * 2 * I * D, f"gate_up blocked {bi}x{bd} w{w} err {err:.1e}")
        for Lx in layers:
            del Lx["w13b"]
        torch.cuda.empty_cache()
    h.copy_(h_ref)
    for bo, bi, sp, w in ((8, 512, 4, 4), (8, 512, 2, 4), (8, 512, 1, 4), (8, 1024, 2, 4), (4, 512, 4, 2), (16, 512, 4, 4), (8, 256, 4, 2), (16, 256, 2, 4), (4, 1024, 2, 4)):
        if (I // sp) % bi:
            continue
        for Lx in layers:
            Lx["w2b"] = Lx["w2"].view(E, D // bo, bo, I // bi, bi).permute(0, 1, 3, 2, 4).contiguous()
        down_var[(2, D // bo, sp)](h, L["w2b"], y, L["experts"], D, I, SPLIT=sp, BLOCK_O=bo, BLOCK_I=bi, num_warps=w)
        torch.cuda.synchronize()
        err = (y[:sp].sum(0) - y_ref.sum(0)).abs().max().item() / y_ref.sum(0).abs().max().item()
        timed(lambda Lx, bo=bo, bi=bi, sp=sp, w=w: down_var[(2, D // bo, sp)](h, Lx["w2b"], y, Lx["experts"], D, I, SPLIT=sp, BLOCK_O=bo, BLOCK_I=bi, num_warps=w),
              2 * I * D, f"down blocked {bo}x{bi} split{sp} w{w} err {err:.1e}")
        for Lx in layers:
            del Lx["w2b"]
        torch.cuda.empty_cache()
    return
    for mode in (0, 1, 2):
        gate_up_var[(2, I // 8)](xn, L["w1"], L["w3"], L["w13b"], h, L["experts"], D, I, MODE=mode, BLOCK_I=8, BLOCK_D=1024, num_warps=4)
        torch.cuda.synchronize()
        err = (h.float() - h_ref.float()).abs().max().item() / h_ref.float().abs().max().item()
        timed(lambda Lx, mode=mode: gate_up_var[(2, I // 8)](xn, Lx["w1"], Lx["w3"], Lx["w13b"], h, Lx["experts"], D, I, MODE=mode, BLOCK_I=8, BLOCK_D=1024, num_warps=4),
              2 * 2 * I * D, f"gate_up var mode {mode} err {err:.1e}")
    return
    for bi, bd, w, st in ((64, 128, 4, 3), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 4), (128, 128, 8, 3), (64, 512, 4, 2), (128, 256, 8, 3)):
        try:
            gate_up_tc[(2, I // bi)](xn, L["w1"], L["w3"], h, L["experts"], D, I, BLOCK_I=bi, BLOCK_D=bd, PDL=False, num_warps=w, num_stages=st)
            torch.cuda.synchronize()
            err = (h.float() - h_ref.float()).abs().max().item() / h_ref.float().abs().max().item()
            timed(lambda Lx, bi=bi, bd=bd, w=w, st=st: gate_up_tc[(2, I // bi)](xn, Lx["w1"], Lx["w3"], h, Lx["experts"], D, I, BLOCK_I=bi, BLOCK_D=bd, PDL=False, num_warps=w, num_stages=st),
                  2 * 2 * I * D, f"gate_up tc {bi}x{bd} w{w} s{st} err {err:.1e}")
        except Exception as ex:
            print("gate_up tc", bi, bd, w, st, "failed", str(ex)[:200])
    for bo, bi, sp, w, st in ((64, 128, 4, 4, 3), (64, 256, 4, 4, 3), (64, 256, 2, 4, 4), (64, 256, 8, 4, 3), (128, 128, 4, 4, 4), (128, 256, 4, 8, 3), (64, 512, 4, 4, 2)):
        try:
            h.copy_(h_ref)
            down_tc[(2, D // bo, sp)](h, L["w2"], y, L["experts"], D, I, SPLIT=sp, BLOCK_O=bo, BLOCK_I=bi, PDL=False, num_warps=w, num_stages=st)
            torch.cuda.synchronize()
            err = (y[:sp].sum(0) - y_ref.sum(0)).abs().max().item() / y_ref.sum(0).abs().max().item()
            timed(lambda Lx, bo=bo, bi=bi, sp=sp, w=w, st=st: down_tc[(2, D // bo, sp)](h, Lx["w2"], y, Lx["experts"], D, I, SPLIT=sp, BLOCK_O=bo, BLOCK_I=bi, PDL=False, num_warps=w, num_stages=st),
                  2 * I * D, f"down tc {bo}x{bi} split{sp} w{w} s{st} err {err:.1e}")
        except Exception as ex:
            print("down tc", bo, bi, sp, w, st, "failed", str(ex)[:200])
    return
    for parts in (("moe",), ("lin",), ("tiny", "lin", "moe")):
        for pdl in (False, True):
            for pre in (False, True):
                for _ in range(2):
                    for L in layers:
                        layer(L, pdl, pre, parts)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for L in layers:
                        layer(L, pdl, pre, parts)
                g.replay()
                torch.cuda.synchronize()
                ts = []
                for _ in range(20):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    g.replay()
                    e.record()
                    e.synchronize()
                    ts.append(s.elapsed_time(e) * 1000 / LAYERS)
                ts.sort()
                us = ts[len(ts) // 2]
                nbytes = 0
                if "moe" in parts:
                    nbytes += 3 * 2 * I * D
                if "lin" in parts:
                    nbytes += QKV * D + D * D
                rows.append(("+".join(parts), pdl, pre, us, nbytes / us / 1e6))
                del g
    print(f"{'parts':16} {'pdl':5} {'pre':5} {'us/layer':>9} {'TB/s':>6}")
    for r in rows:
        print(f"{r[0]:16} {str(r[1]):5} {str(r[2]):5} {r[3]:9.1f} {r[4]:6.2f}")


main()
