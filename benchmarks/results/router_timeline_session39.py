"""Session 39: when the router's program becomes resident, against wo's completion (its PDL wait's return), and
when gate_up's programs get past their wait. Needs .devtmp/timeline.patch applied."""
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "scripts")
import benchmark as b  # noqa: E402
from gpt_fast_mixtral import generate as g  # noqa: E402
from gpt_fast_mixtral.kernels import pdl  # noqa: E402


@triton.jit
def _tick(out_ptr, N: tl.constexpr):
    for i in range(N):
        tl.store(out_ptr + i, tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [tl.program_id(0) + i],
                                                         dtype=tl.int64, is_pure=False, pack=1))


ticks = torch.zeros(512, dtype=torch.int64, device="cuda")
_tick[(1,)](ticks, N=512, num_warps=1)
t = ticks.cpu().tolist()
d = sorted({y - x for x, y in zip(t, t[1:])})
print("globaltimer deltas (ns):", d[:12], "span", t[-1] - t[0])

device = torch.device("cuda")
torch.manual_seed(0)
args = b.CONFIGS["mixtral-8x7b"]
model = b.random_model(args, "int8", device, None)
pdl.TIMELINE = torch.zeros(8192, dtype=torch.int64, device=device)
engine = g.Engine(model, b.NullTokenizer(args.vocab_size), max_batch_size=1, max_seq_len=2048, compile=True)
prompt = [b.synthetic_prompt(5, args.vocab_size, 0)]
b.time_generate(engine, prompt, 4)
layer_of = {layer.block_sparse_moe.gate.weight.data_ptr(): i for i, layer in enumerate(model.layers)}
router_tag = {layer_of[p]: t for p, t in pdl._TAGS["router"].items() if p in layer_of}
gu_tag = {}
for i, layer in enumerate(model.layers):
    w1 = layer.block_sparse_moe.cond_ffn.w1
    tags = pdl._TAGS.get("gate_up", {})
    if w1.data_ptr() in tags:
        gu_tag[i] = tags[w1.data_ptr()]
print("tags", len(router_tag), len(gu_tag))
for n in (8, 60, 120, 200):
    pdl.TIMELINE.zero_()
    total, ttft = b.time_generate(engine, prompt, n)
    torch.cuda.synchronize()
    buf = pdl.TIMELINE.cpu().tolist()
    rows = []
    for L in range(len(model.layers)):
        r = buf[router_tag[L] * 8: router_tag[L] * 8 + 8]
        gb = 4096 + gu_tag[L] * 64
        gus = [buf[gb + s * 8: gb + s * 8 + 8] for s in range(2)]
        rows.append((r, gus))
    def med(xs):
        return statistics.median(xs) / 1000
    r2 = [r[2] for r, _ in rows]
    period = [b_ - a for a, b_ in zip(r2, r2[1:])]
    print(f"n={n} ({199 if n == 200 else n - 1} steps, {(n - 1) / (total - ttft):.1f} tok/s): layer period (router wait to "
          f"wait) median {med(period):.2f} us")
    print("  router resident before wo done (r2 - r0) median %.2f min %.2f max %.2f us" % (
        med([r[2] - r[0] for r, _ in rows]), min(r[2] - r[0] for r, _ in rows) / 1000, max(r[2] - r[0] for r, _ in rows) / 1000))
    print("  router after wait (r3 - r2) median %.2f us" % med([r[3] - r[2] for r, _ in rows]))
    print("  gate_up slot programs resident (g0 - r0) median %.2f; past wait after router end (g2 - r3) median %.2f; "
          "first program's run (g3 - g2) median %.2f us" % (
              med([gus[0][0] - r[0] for r, gus in rows]), med([gus[0][2] - r[3] for r, gus in rows]),
              med([gus[0][3] - gus[0][2] for r, gus in rows])))
    print("  next router's wait after this gate_up's wait (r2[L+1] - g2[L]) median %.2f us" % med(
        [rows[L + 1][0][2] - rows[L][1][0][2] for L in range(len(rows) - 1)]))
    print("  router SMs", sorted({r[4] for r, _ in rows})[:10])
    for L in (0, 1, 15, 31):
        r, gus = rows[L]
        base = r[2]
        print(f"   L{L}: r0 {(r[0] - base) / 1000:+.2f} r2 0 r3 {(r[3] - base) / 1000:+.2f} | gu0 {(gus[0][0] - base) / 1000:+.2f} "
              f"{(gus[0][2] - base) / 1000:+.2f} {(gus[0][3] - base) / 1000:+.2f} | gu1 {(gus[1][0] - base) / 1000:+.2f} "
              f"{(gus[1][2] - base) / 1000:+.2f} {(gus[1][3] - base) / 1000:+.2f}")
