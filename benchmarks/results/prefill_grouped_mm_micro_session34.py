"""Session 34 micro (h200_s34_prefill_grouped_mm_micro.log): the int8 prefill experts at T tokens (Mixtral's shape,
random top-2 routing), the fused grouped kernels (kernels.moe, as of 65b44ca) against dequantising each layer's
experts to bfloat16 and running torch._grouped_mm (PyTorch's CUTLASS grouped GEMM), sequentially and with the
dequantisation of the next layer on a side stream. The "TFLOP/s equiv" column divides the whole MoE's FLOPs by
each row's time (meaningful only for rows A, C, S, O). Command: [T=2048] PYTHONPATH=. python3 <this file>"""
import os, statistics, sys
import torch
import torch.nn.functional as F
sys.path[:0] = ["."]
from gpt_fast_mixtral.kernels import moe as M
from gpt_fast_mixtral.kernels.linear import dequantize, _dequantize_kernel
import triton


def deq_into(w, s, out):
    n, k = w.shape
    _dequantize_kernel[(triton.cdiv(n, 8), triton.cdiv(k, 1024))](w, s, out, n, k, BLOCK_N=8, BLOCK_K=1024, num_warps=4)

dev = torch.device("cuda")
E, D, I, K = 8, 4096, 14336, 2
T = int(os.environ.get("T", "2048"))
LAYERS = int(os.environ.get("LAYERS", "4"))
torch.manual_seed(0)


def timeit(fn, iters=10, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        res.append(a.elapsed_time(b))
    return statistics.median(res)


def make_layer():
    w1 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev)
    w3 = torch.randint(-127, 128, (E, I, D), dtype=torch.int8, device=dev)
    w2 = torch.randint(-127, 128, (E, D, I), dtype=torch.int8, device=dev)
    s1 = (torch.rand(E, I, device=dev) * 2e-4 + 1e-4).bfloat16()
    s3 = (torch.rand(E, I, device=dev) * 2e-4 + 1e-4).bfloat16()
    s2 = (torch.rand(E, D, device=dev) * 2e-4 + 1e-4).bfloat16()
    return w1, w2, w3, (s1, s2, s3)


layers = [make_layer() for _ in range(LAYERS)]
x = torch.randn(T, D, device=dev).bfloat16()
logits = torch.randn(T, E, device=dev)
rw, idx = torch.topk(logits.softmax(-1), K, dim=-1)
rw = (rw / rw.sum(-1, keepdim=True)).bfloat16()
idx = idx.to(torch.int64)

w1, w2, w3, sc = layers[0]
w1b, w3b = M.block_rows(w1, (8, 512)), M.block_rows(w3, (8, 512))
flops = 2 * T * K * 3 * D * I
rows = []

# A: the current fused grouped kernels (int8, blocked w13)
ta = timeit(lambda: M.fused_moe(x, w1b, w2, w3b, rw, idx, sc, w13_block=(8, 512)))
rows.append(("A fused int8 grouped (now)", ta))
ref = M.fused_moe(x, w1b, w2, w3b, rw, idx, sc, w13_block=(8, 512)).float()

# scratch: w13 bf16 [E, 2I, D] (gate rows then up rows), w2 bf16 [E, D, I]
w13s = [torch.empty(E, 2 * I, D, dtype=torch.bfloat16, device=dev) for _ in range(2)]
w2s = [torch.empty(E, D, I, dtype=torch.bfloat16, device=dev) for _ in range(2)]


def deq(layer, buf, scaled=True):
    w1, w2, w3, (s1, s2, s3) = layer
    for e in range(E):
        deq_into(w1[e], s1[e], w13s[buf][e, :I])
        deq_into(w3[e], s3[e], w13s[buf][e, I:])
        deq_into(w2[e], s2[e], w2s[buf][e])


def deq_fast(layer, buf):
    w1, w2, w3, (s1, s2, s3) = layer
    dequantize(w1.view(E * I, D), s1.reshape(-1), torch.bfloat16)  # timing of the kernel alone, no copy
    dequantize(w3.view(E * I, D), s3.reshape(-1), torch.bfloat16)
    dequantize(w2.view(E * D, I), s2.reshape(-1), torch.bfloat16)


td = timeit(lambda: deq_fast(layers[0], 0))
rows.append(("D dequant 3 x [E*N, K] int8 -> bf16 (alloc'd)", td))
deq(layers[0], 0)
rows.append(("D' dequant into scratch (24 kernels)", timeit(lambda: deq(layers[0], 0))))

flat = idx.reshape(-1)
order = torch.argsort(flat, stable=True)
counts = torch.bincount(flat, minlength=E)
offs = torch.cumsum(counts, 0).to(torch.int32)
tok = order // K


def grouped(buf, out_dtype=None):
    xg = x[tok]
    g = torch._grouped_mm(xg, w13s[buf].transpose(1, 2), offs=offs, out_dtype=out_dtype)
    h = (F.silu(g[:, :I].float()) * g[:, I:].float()).bfloat16()
    y = torch._grouped_mm(h, w2s[buf].transpose(1, 2), offs=offs, out_dtype=out_dtype)
    y = y.float() * rw.reshape(-1)[order][:, None].float()
    out = torch.zeros(T, D, device=dev, dtype=torch.float32)
    out.index_add_(0, tok, y)
    return out.bfloat16()


try:
    got = grouped(0).float()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"grouped_mm vs fused: rel err {err:.2e}", flush=True)
    tc = timeit(lambda: grouped(0))
    rows.append(("C grouped_mm path (bf16 out), no dequant", tc))
    xg = x[tok]
    tgu = timeit(lambda: torch._grouped_mm(xg, w13s[0].transpose(1, 2), offs=offs))
    hh = torch.randn(T * K, I, device=dev).bfloat16()
    tdn = timeit(lambda: torch._grouped_mm(hh, w2s[0].transpose(1, 2), offs=offs))
    rows.append(("C1 grouped_mm gate_up only", tgu))
    rows.append(("C2 grouped_mm down only", tdn))
    print(f"grouped_mm TFLOP/s: gate_up {2*T*K*2*I*D/tgu/1e9:.0f}, down {2*T*K*I*D/tdn/1e9:.0f}", flush=True)
    def glue():
        xg = x[tok]
        g = torch.empty(T * K, 2 * I, device=dev, dtype=torch.bfloat16)
        h = (F.silu(g[:, :I].float()) * g[:, I:].float()).bfloat16()
        y = torch.empty(T * K, D, device=dev, dtype=torch.bfloat16)
        y = y.float() * rw.reshape(-1)[order][:, None].float()
        out = torch.zeros(T, D, device=dev, dtype=torch.float32)
        out.index_add_(0, tok, y)
        return out.bfloat16()
    rows.append(("C3 the torch glue alone", timeit(glue)))
    # sequential: dequant + grouped per layer
    def seq():
        for l in range(LAYERS):
            deq(layers[l], 0)
            grouped(0)
    ts = timeit(seq, iters=3, warm=1) / LAYERS
    rows.append(("S dequant (24 kernels) + grouped, sequential, per layer", ts))
    side = torch.cuda.Stream()
    def overlapped():
        ready = [torch.cuda.Event() for _ in range(LAYERS)]
        free = [torch.cuda.Event() for _ in range(LAYERS)]
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        for l in range(LAYERS):
            with torch.cuda.stream(side):
                if l >= 2:
                    side.wait_event(free[l - 2])
                deq(layers[l], l % 2)
                ready[l].record(side)
            if l >= 1:
                main.wait_event(ready[l - 1])
                grouped((l - 1) % 2)
                free[l - 1].record(main)
        main.wait_event(ready[LAYERS - 1])
        grouped((LAYERS - 1) % 2)
    to = timeit(overlapped, iters=3, warm=1) / LAYERS
    rows.append(("O dequant on side stream overlapped with grouped, per layer", to))
except Exception as exc:  # noqa: BLE001
    print("grouped_mm failed:", type(exc).__name__, exc, flush=True)

print(f"\nT={T} tokens, {torch.cuda.get_device_name()}, torch {torch.__version__}")
for name, ms in rows:
    print(f"{name:70s} {ms:8.3f} ms  ({flops / ms / 1e9:.0f} TFLOP/s equiv)")
