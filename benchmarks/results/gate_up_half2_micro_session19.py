"""Session 19: gate_up decode GEMV variants (int8 experts, Mixtral-8x7B, 2 routed experts, 8 layers rotated in one
CUDA graph) against the package kernel: f16x2 products (HFMA2) summed per element over the loop (mode 0: x
converted to float16 beforehand; gate_up_h2x: bf16 x scaled per row inside the kernel, what landed as
kernels.moe._gate_up_gemv_tile_half2), and tensor-core dots (mma, modes 1 and 2) of the int8->fp16 tile with x.
Run from the repository root on a GPU: python3 benchmarks/results/gate_up_half2_micro_session19.py
(set MODES / BIS / STS below: the first call swept modes 0-2, rows 8-64, 1-2 stages, 4-8 warps).
Results (H200, torch 2.11.0+cu130, Triton 3.6), us per layer:
  call 1: package (16 rows) 59.25 / 60.21; mode 0 rows 8: 58.14, rows 16: 59.55, rows 32: 61.1-63.3;
          stages 2 slower everywhere; mma modes 72-395 (the converted tile goes through shared memory)
  call 2: package 60.15 / 61.25; mode 0 rows 8: 57.90, rows 16: 60.84
  call 3: package 60.48 / 61.80; mode 0 rows 8: 57.62; gate_up_h2x rows 8 4 warps 57.86, 2 warps 60.54,
          rows 16 62.29, X_LIMIT 32 59.05
Relative error against a float32 product of the same int8 weights: 1.9e-3 (float16 products), 1.7e-3
(package, float32 products, bfloat16 output)."""
import sys
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels import moe
from gpt_fast_mixtral.kernels.moe import int8_to_fp16, _w13_rows, _w13_col


@triton.jit
def hfma2(a, b, c):
    return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def fp16_biased(w):
    """int8 w as float16 1152 + w (no subtraction)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 u, hi; xor.b32 u, $2, 0x80808080; mov.b32 hi, 0x64646464; "
        "prmt.b32 $0, u, hi, 0x4140; prmt.b32 $1, u, hi, 0x4342; }",
        "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def gate_up_h2(x16_ptr, xs_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, experts_ptr, top_k, dim, inter,
               stride_we, stride_wi, stride_se, stride_h, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
               BR: tl.constexpr, BC: tl.constexpr, STAGES: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: HFMA2 per element, one float32 reduction at the end; 1: mma (tl.dot) of the exact fp16 tile;
    2: mma of 1152 + w, minus 1152 * sum(x)."""
    slot = tl.program_id(0)
    i_block = tl.program_id(1)
    offs_i = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    token = slot // top_k
    w_base = _w13_rows(expert, offs_i, dim, stride_we, stride_wi, BR, BC)[:, None]
    if MODE == 0:
        pg = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float16)
        pu = tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float16)
    else:
        ag = tl.zeros((BLOCK_I, 16), dtype=tl.float32)
        au = tl.zeros((BLOCK_I, 16), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_D, 16), dtype=tl.float32)
    for d0 in tl.range(0, dim, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        w_offsets = w_base + (_w13_col(d0, BLOCK_D, BR, BC) + tl.arange(0, BLOCK_D))[None, :]
        if MODE == 0:
            x = tl.load(x16_ptr + token * dim + offs_d[None, :])
            w1 = int8_to_fp16(tl.load(w1_ptr + w_offsets))
            w3 = int8_to_fp16(tl.load(w3_ptr + w_offsets))
            pg = hfma2(w1, tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), pg)
            pu = hfma2(w3, tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), pu)
        else:
            col = tl.arange(0, 16)
            xc = tl.load(x16_ptr + token * dim + offs_d[:, None] + col[None, :] * 0, mask=(col == 0)[None, :],
                         other=0.0)
            if MODE == 1:
                w1 = int8_to_fp16(tl.load(w1_ptr + w_offsets))
                w3 = int8_to_fp16(tl.load(w3_ptr + w_offsets))
            else:
                w1 = fp16_biased(tl.load(w1_ptr + w_offsets))
                w3 = fp16_biased(tl.load(w3_ptr + w_offsets))
                xsum += xc.to(tl.float32)
            ag = tl.dot(w1, xc, ag)
            au = tl.dot(w3, xc, au)
    if MODE == 0:
        gate = tl.sum(pg.to(tl.float32), axis=1)
        up = tl.sum(pu.to(tl.float32), axis=1)
    else:
        gate = tl.sum(ag, axis=1)
        up = tl.sum(au, axis=1)
        if MODE == 2:
            bias = tl.sum(tl.sum(xsum, axis=1), axis=0) * 1152.0
            gate -= bias
            up -= bias
    xs = tl.load(xs_ptr + token)
    gate *= tl.load(s1_ptr + expert * stride_se + offs_i).to(tl.float32) * xs
    up *= tl.load(s3_ptr + expert * stride_se + offs_i).to(tl.float32) * xs
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot * stride_h + offs_i, h.to(h_ptr.dtype.element_ty))


MODES, BIS, STS = (0,), (8,), (1,)

@triton.jit
def gate_up_h2x(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, experts_ptr, top_k, dim, inter,
                stride_we, stride_wi, stride_se, stride_h, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
                BR: tl.constexpr, BC: tl.constexpr, DIM_P2: tl.constexpr, X_LIMIT: tl.constexpr):
    """HFMA2 from bf16 x: the first tile's weights are loaded, then the row's max |x| (-> a power-of-two scale
    putting it <= X_LIMIT), then the loop (x chunks scaled into float16)."""
    slot = tl.program_id(0)
    i_block = tl.program_id(1)
    offs_i = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    token = (slot // top_k).to(tl.int64)
    w_base = _w13_rows(expert, offs_i, dim, stride_we, stride_wi, BR, BC)[:, None]
    w_offsets = w_base + tl.arange(0, BLOCK_D)[None, :]
    w1 = tl.load(w1_ptr + w_offsets)
    w3 = tl.load(w3_ptr + w_offsets)
    offs_all = tl.arange(0, DIM_P2)
    x_all = tl.load(x_ptr + token * dim + offs_all, mask=offs_all < dim, other=0.0).to(tl.float32)
    x_max = tl.max(tl.abs(x_all), axis=0)
    # 2**-e with x_max * 2**-e <= X_LIMIT: e from the float32 exponent bits of x_max / X_LIMIT, rounded up
    bits = (x_max / X_LIMIT).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    e = tl.maximum(e, -100)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    xs = ((127 + e) << 23).to(tl.float32, bitcast=True)
    x = (tl.load(x_ptr + token * dim + tl.arange(0, BLOCK_D)[None, :]).to(tl.float32) * inv).to(tl.float16)
    pg = hfma2(int8_to_fp16(w1), tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float16))
    pu = hfma2(int8_to_fp16(w3), tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), tl.zeros((BLOCK_I, BLOCK_D), dtype=tl.float16))
    for d0 in range(BLOCK_D, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = (tl.load(x_ptr + token * dim + offs_d[None, :]).to(tl.float32) * inv).to(tl.float16)
        w_offsets = w_base + (_w13_col(d0, BLOCK_D, BR, BC) + tl.arange(0, BLOCK_D))[None, :]
        pg = hfma2(int8_to_fp16(tl.load(w1_ptr + w_offsets)), tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), pg)
        pu = hfma2(int8_to_fp16(tl.load(w3_ptr + w_offsets)), tl.broadcast_to(x, (BLOCK_I, BLOCK_D)), pu)
    gate = tl.sum(pg.to(tl.float32), axis=1)
    up = tl.sum(pu.to(tl.float32), axis=1)
    gate *= tl.load(s1_ptr + expert * stride_se + offs_i).to(tl.float32) * xs
    up *= tl.load(s3_ptr + expert * stride_se + offs_i).to(tl.float32) * xs
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + slot * stride_h + offs_i, h.to(h_ptr.dtype.element_ty))


def main():
    from graph_timing import graph_replay_us
    dev = "cuda"
    L, E, I, D = 8, 8, 14336, 4096
    block = (8, 512)
    g = torch.Generator(device=dev).manual_seed(0)
    w1s = [moe.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev, generator=g), block)
           for _ in range(L)]
    w3s = [moe.block_rows(torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev, generator=g), block)
           for _ in range(L)]
    s13 = (torch.rand(E, I, device=dev, generator=g) * 1e-2).bfloat16()
    experts = [torch.randperm(E, device=dev, generator=g)[:2].contiguous() for _ in range(L)]
    x = torch.randn(1, D, device=dev, dtype=torch.bfloat16, generator=g)
    x[0, 7] = 40.0  # an outlier, as real activations have
    e = torch.ceil(torch.log2(x.float().abs().amax(dim=1) / 16))
    xs = (2.0 ** e).float()
    x16 = (x.float() / xs[:, None]).half()
    h = torch.empty(2, I, device=dev, dtype=torch.bfloat16)
    c = moe.DEFAULT_CONFIG
    block_i = moe.gemv_rows(I, c, block)
    stages, _ = moe.gemv_stages_for(c, 1, 2 * (I // block_i), block_i, 7)

    def pkg(i):
        moe._gate_up_gemv_kernel[(2, I // block_i)](
            x, w1s[i], w3s[i], s13, s13, h, experts[i], 2, 0, D, I, x.stride(0), w1s[i].stride(0), w1s[i].stride(1),
            s13.stride(0), h.stride(0), HAS_SCALES=True, MAGIC=True, BLOCK_I=block_i, BLOCK_D=512, PERSISTENT=False,
            BR=8, BC=512, STAGES=stages, num_warps=4)

    def ref(i):
        w1 = moe.unblock_rows(w1s[i], block)[experts[i]].float()
        w3 = moe.unblock_rows(w3s[i], block)[experts[i]].float()
        gate = (w1 @ x.float()[0]) * s13[experts[i]].float()
        up = (w3 @ x.float()[0]) * s13[experts[i]].float()
        return torch.nn.functional.silu(gate) * up

    r = ref(0)
    pkg(0)
    err = lambda out: ((out.float() - r).norm() / r.norm()).item()
    base = graph_replay_us(lambda: [pkg(i) for i in range(L)]) / L
    print(f"package BLOCK_I={block_i} stages={stages}: {base:6.2f} us  err {err(h):.1e}", flush=True)
    torch.cuda.synchronize(); pkg(0); torch.cuda.synchronize()
    print("pkg", h[:, :4].tolist(), "ref", r[:, :4].tolist(), "err", err(h))
    for mode in MODES:
        for bi in BIS:
            for st in STS:
                for warps in (4, 8) if bi >= 16 else (4,):
                    def run(i, bi=bi, st=st, warps=warps, mode=mode):
                        gate_up_h2[(2, I // bi)](x16, xs, w1s[i], w3s[i], s13, s13, h, experts[i], 2, D, I,
                                                 w1s[i].stride(0), w1s[i].stride(1), s13.stride(0), h.stride(0),
                                                 BLOCK_I=bi, BLOCK_D=512, BR=8, BC=512, STAGES=st, MODE=mode,
                                                 num_warps=warps)
                    name = f"mode{mode} BLOCK_I={bi:2} stages={st} warps={warps}"
                    try:
                        h.zero_()
                        run(0)
                        e_ = err(h)
                        us = graph_replay_us(lambda: [run(i) for i in range(L)]) / L
                        k = run.__defaults__
                        print(f"{name}: {us:6.2f} us  err {e_:.1e}", flush=True)
                    except Exception as failure:  # noqa: BLE001
                        print(f"{name}: failed {type(failure).__name__}: {str(failure)[:200]}", flush=True)
    for bi, warps, lim in ((8, 4, 16.0), (8, 2, 16.0), (16, 4, 16.0), (8, 4, 32.0)):
        def runx(i, bi=bi, warps=warps, lim=lim):
            gate_up_h2x[(2, I // bi)](x, w1s[i], w3s[i], s13, s13, h, experts[i], 2, D, I, w1s[i].stride(0),
                                      w1s[i].stride(1), s13.stride(0), h.stride(0), BLOCK_I=bi, BLOCK_D=512, BR=8,
                                      BC=512, DIM_P2=triton.next_power_of_2(D), X_LIMIT=lim, num_warps=warps)
        h.zero_(); runx(0); e_ = err(h)
        us = graph_replay_us(lambda: [runx(i) for i in range(L)]) / L
        print(f"mode3 (bf16 x, own scale) BLOCK_I={bi:2} warps={warps} limit {lim}: {us:6.2f} us  err {e_:.1e}", flush=True)
    base = graph_replay_us(lambda: [pkg(i) for i in range(L)]) / L
    print(f"package again: {base:6.2f} us", flush=True)


if __name__ == "__main__":
    main()
