"""Is the int8 decode expert GEMV bound by memory or by its instructions? The package kernels against
variants that read the same bytes in the same tiles as int32 words and only add them (no dequantisation,
no FMAs). 8 layers of Mixtral-8x7B int8 experts rotated in one CUDA graph, 2 routed experts each."""
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels import moe

@triton.jit
def gate_up_words(w1_ptr, w3_ptr, h_ptr, experts_ptr, dim, stride_we, BLOCK_I: tl.constexpr, BC: tl.constexpr):
    slot = tl.program_id(0); i_block = tl.program_id(1)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    WORDS: tl.constexpr = BC // 4
    rows = tl.arange(0, BLOCK_I)
    base = (expert * stride_we + i_block.to(tl.int64) * (BLOCK_I * dim)) // 4
    acc = tl.zeros((BLOCK_I, WORDS), dtype=tl.int32)
    w1p = w1_ptr.to(tl.pointer_type(tl.int32)); w3p = w3_ptr.to(tl.pointer_type(tl.int32))
    for d0 in range(0, dim, BC):
        offs = base + (d0 * BLOCK_I) // 4 + rows[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
        acc += tl.load(w1p + offs) ^ tl.load(w3p + offs)
    tl.store(h_ptr + slot * 14336 + i_block * BLOCK_I + rows, tl.sum(acc, axis=1).to(tl.float32).to(tl.bfloat16))

@triton.jit
def down_words(w2_ptr, y_ptr, experts_ptr, inter, stride_we, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    slot = tl.program_id(0); o_block = tl.program_id(1); split = tl.program_id(2)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    WORDS: tl.constexpr = BLOCK_I // 4
    rows = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
    split_len = inter // SPLIT
    w2p = w2_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_O, WORDS), dtype=tl.int32)
    for i0 in range(split * split_len, (split + 1) * split_len, BLOCK_I):
        offs = (expert * stride_we + rows[:, None].to(tl.int64) * inter + i0) // 4 + tl.arange(0, WORDS)[None, :]
        acc += tl.load(w2p + offs)
    tl.store(y_ptr + (split * 2 + slot) * 4096 + rows, tl.sum(acc, axis=1).to(tl.float32))


@triton.jit
def deq(w, PRMT: tl.constexpr):
    if PRMT:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 u, m; xor.b32 u, $4, 0x80808080; mov.b32 m, 0x4B000000; "
            "prmt.b32 $0, u, m, 0x7540; prmt.b32 $1, u, m, 0x7541; prmt.b32 $2, u, m, 0x7542; "
            "prmt.b32 $3, u, m, 0x7543; sub.f32 $0, $0, 0f4B000080; sub.f32 $1, $1, 0f4B000080; "
            "sub.f32 $2, $2, 0f4B000080; sub.f32 $3, $3, 0f4B000080; }",
            "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

@triton.jit
def gate_up_v(x_ptr, w1_ptr, w3_ptr, s_ptr, h_ptr, experts_ptr, dim, stride_we, inter,
              BLOCK_I: tl.constexpr, BC: tl.constexpr, ACC2D: tl.constexpr, PRMT: tl.constexpr):
    slot = tl.program_id(0); i_block = tl.program_id(1)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    rows = tl.arange(0, BLOCK_I); cols = tl.arange(0, BC)
    base = expert * stride_we + i_block.to(tl.int64) * (BLOCK_I * dim) + rows[:, None] * BC + cols[None, :]
    g2 = tl.zeros((BLOCK_I, BC), dtype=tl.float32); u2 = tl.zeros((BLOCK_I, BC), dtype=tl.float32)
    g = tl.zeros((BLOCK_I,), dtype=tl.float32); u = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for d0 in range(0, dim, BC):
        x = tl.load(x_ptr + d0 + cols[None, :]).to(tl.float32)
        w1 = deq(tl.load(w1_ptr + base + d0 * BLOCK_I), PRMT)
        w3 = deq(tl.load(w3_ptr + base + d0 * BLOCK_I), PRMT)
        if ACC2D:
            g2 += w1 * x; u2 += w3 * x
        else:
            g += tl.sum(w1 * x, axis=1); u += tl.sum(w3 * x, axis=1)
    if ACC2D:
        g = tl.sum(g2, axis=1); u = tl.sum(u2, axis=1)
    offs_i = i_block * BLOCK_I + rows
    sc = tl.load(s_ptr + expert * inter + offs_i).to(tl.float32)
    g *= sc; u *= sc
    tl.store(h_ptr + slot * inter + offs_i, (g * tl.sigmoid(g) * u).to(tl.bfloat16))

@triton.jit
def down_v(h_ptr, w2_ptr, s_ptr, y_ptr, experts_ptr, inter, stride_we, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr,
           BLOCK_I: tl.constexpr, ACC2D: tl.constexpr, PRMT: tl.constexpr):
    slot = tl.program_id(0); o_block = tl.program_id(1); split = tl.program_id(2)
    expert = tl.load(experts_ptr + slot).to(tl.int64)
    rows = o_block * BLOCK_O + tl.arange(0, BLOCK_O); cols = tl.arange(0, BLOCK_I)
    split_len = inter // SPLIT
    base = expert * stride_we + rows[:, None].to(tl.int64) * inter + cols[None, :]
    a2 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32); a = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for i0 in range(split * split_len, (split + 1) * split_len, BLOCK_I):
        hv = tl.load(h_ptr + slot * inter + i0 + cols[None, :]).to(tl.float32)
        w = deq(tl.load(w2_ptr + base + i0), PRMT)
        if ACC2D:
            a2 += w * hv
        else:
            a += tl.sum(w * hv, axis=1)
    if ACC2D:
        a = tl.sum(a2, axis=1)
    a *= tl.load(s_ptr + expert * 4096 + rows).to(tl.float32)
    tl.store(y_ptr + (split * 2 + slot) * 4096 + rows, a)

dev = "cuda"
L, E, I, D = 8, 8, 14336, 4096
g = torch.Generator(device=dev).manual_seed(0)
w1s = [torch.randint(-127, 127, (E, I, D), dtype=torch.int8, device=dev, generator=g) for _ in range(L)]
w3s = [torch.randint(-127, 127, (E, I, D), dtype=torch.int8, device=dev, generator=g) for _ in range(L)]
w2s = [torch.randint(-127, 127, (E, D, I), dtype=torch.int8, device=dev, generator=g) for _ in range(L)]
s13 = torch.rand(E, I, device=dev, dtype=torch.bfloat16); s2 = torch.rand(E, D, device=dev, dtype=torch.bfloat16)
experts = [torch.randperm(E, device=dev)[:2].contiguous() for _ in range(L)]
routing = torch.tensor([0.6, 0.4], device=dev, dtype=torch.bfloat16)
x = torch.randn(1, D, device=dev, dtype=torch.bfloat16)
h = torch.empty(2, I, device=dev, dtype=torch.bfloat16)
y = torch.empty(4, 2, D, device=dev, dtype=torch.float32)
c = moe.DEFAULT_CONFIG

def gate_up_pkg(i):
    moe._gate_up_gemv_kernel[(2, I // 8)](x, w1s[i], w3s[i], s13, s13, h, experts[i], 2, 0, D, I, x.stride(0),
        w1s[i].stride(0), w1s[i].stride(1), s13.stride(0), h.stride(0), HAS_SCALES=True, MAGIC=True, BLOCK_I=8,
        BLOCK_D=512, PERSISTENT=False, BR=8, BC=512, num_warps=4)

def gate_up_mem(i):
    gate_up_words[(2, I // 8)](w1s[i], w3s[i], h, experts[i], D, w1s[i].stride(0), BLOCK_I=8, BC=512, num_warps=4)

def down_pkg(i):
    moe._down_gemv_kernel[(2, D // 8, 4)](h, w2s[i], s2, y, experts[i], routing, 0, D, I, h.stride(0),
        w2s[i].stride(0), w2s[i].stride(1), s2.stride(0), y.stride(1), y.stride(0), HAS_SCALES=True, MAGIC=True,
        SPLIT=4, BLOCK_O=8, BLOCK_I=512, PERSISTENT=False, num_warps=4)

def down_mem(i):
    down_words[(2, D // 8, 4)](w2s[i], y, experts[i], I, w2s[i].stride(0), SPLIT=4, BLOCK_O=8, BLOCK_I=512, num_warps=4)

def timed(fn):
    def step():
        for i in range(L):
            fn(i)
    step(); torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); graph.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / L)
    times.sort()
    return times[len(times) // 2]

def gv(a2, pr):
    return lambda i: gate_up_v[(2, I // 8)](x, w1s[i], w3s[i], s13, h, experts[i], D, w1s[i].stride(0), I, BLOCK_I=8, BC=512,
                                            ACC2D=a2, PRMT=pr, num_warps=4)

def dv(a2, pr):
    return lambda i: down_v[(2, D // 8, 4)](h, w2s[i], s2, y, experts[i], I, w2s[i].stride(0), SPLIT=4, BLOCK_O=8,
                                            BLOCK_I=512, ACC2D=a2, PRMT=pr, num_warps=4)

# correctness of the variants against the package kernels
gate_up_pkg(0); ref_h = h.clone()
for a2 in (False, True):
    for pr in (False, True):
        gv(a2, pr)(0)
        err = ((h.float() - ref_h.float()).norm() / ref_h.float().norm()).item()
        print("gate_up variant", a2, pr, "rel err vs package", f"{err:.2e}")
h.copy_(ref_h); down_pkg(0); ref_y = y.clone()
for a2 in (False, True):
    for pr in (False, True):
        dv(a2, pr)(0)
        err = ((y[:, :, :] * 1 - ref_y / routing.float()[None, :, None]).norm() / (ref_y / routing.float()[None, :, None]).norm()).item()
        print("down variant", a2, pr, "rel err vs package", f"{err:.2e}")

extra = []
for a2 in (False, True):
    for pr in (False, True):
        extra.append((f"gate_up a2={int(a2)} prmt={int(pr)}", gv(a2, pr), 2 * 2 * I * D / 1e6))
for a2 in (False, True):
    for pr in (False, True):
        extra.append((f"down a2={int(a2)} prmt={int(pr)}", dv(a2, pr), 2 * I * D / 1e6))

for name, fn, mb in extra + [("gate_up package", gate_up_pkg, 2 * 2 * I * D / 1e6), ("gate_up words", gate_up_mem, 2 * 2 * I * D / 1e6),
                     ("down package", down_pkg, 2 * I * D / 1e6), ("down words", down_mem, 2 * I * D / 1e6)]:
    t = timed(fn)
    print(f"{name:16} {t:7.2f} us  {mb / t:5.2f} TB/s", flush=True)
