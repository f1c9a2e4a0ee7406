"""Session 22 archive: NAME=half2 BASIC=1 PYTHONPATH=. python3 benchmarks/results/power_probe_session22.py
(and NAME=fp32 MOE="{\"gemv_int8_half2\": False}"); nvidia-h200, torch 2.11.0+cu130; log h200_s22a_power_probe.log.
Sustained (power-capped?) vs fresh rates: copy, read-only, decode; power / SM clock per workload."""
import dataclasses, os, subprocess, sys, time, statistics
sys.path[:0] = ["scripts", "."]
import torch, triton, triton.language as tl
import benchmark as B
from gpt_fast_mixtral.generate import Engine
from gpt_fast_mixtral.kernels import moe as moe_kernels

dev = torch.device("cuda")
OUT = os.environ["OUT"]; NAME = os.environ.get("NAME", "x")
smi_path = f"{OUT}/smi_{NAME}.csv"
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active",
                        "--format=csv,noheader,nounits", "-lms", "100"], stdout=open(smi_path, "w"))

@triton.jit
def _read(x_ptr, out_ptr, ITER: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * ITER * BLOCK
    acc = tl.zeros([BLOCK // 16], dtype=tl.int32)
    for i in tl.range(ITER):
        v = tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK // 16)[:, None] * 16 + tl.arange(0, 16)[None, :].to(tl.int64))
        acc += tl.max(v.to(tl.int32), axis=1)
    tl.store(out_ptr + pid * (BLOCK // 16) + tl.arange(0, BLOCK // 16), acc)

marks = []
def sustain(label, fn, units, seconds=3.0, idle=2.0):
    torch.cuda.synchronize(); time.sleep(idle)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    t0 = time.time(); rates = []
    while time.time() - t0 < seconds:
        ev[0].record()
        for _ in range(units[1]):
            fn()
        ev[1].record(); torch.cuda.synchronize()
        rates.append(units[0] * units[1] * 1e3 / ev[0].elapsed_time(ev[1]))
    marks.append((label, t0, time.time()))
    k = max(1, len(rates) // 5)
    print(f"{label:28} first {statistics.mean(rates[:k]):9.1f}  last {statistics.mean(rates[-2*k:]):9.1f}  "
          f"({len(rates)} windows)", flush=True)

moe_kernels.DEFAULT_CONFIG = dataclasses.replace(moe_kernels.DEFAULT_CONFIG, **eval(os.environ.get("MOE", "{}")))
if os.environ.get("BASIC"):
    n = 2 << 30
    src = torch.empty(n, dtype=torch.int8, device=dev).random_(-100, 100); dst = torch.empty_like(src)
    sustain("copy GB/s (r+w)", lambda: dst.copy_(src), (2 * n / 1e9, 20))
    BLOCK, ITER = 4096, 64
    out = torch.empty(n // ITER // 16, dtype=torch.int32, device=dev)
    rd = lambda: _read[(n // (BLOCK * ITER),)](src, out, ITER=ITER, BLOCK=BLOCK, num_warps=8)
    rd(); sustain("read GB/s", rd, (n / 1e9, 40))
    del src, dst, out; torch.cuda.empty_cache()
args = B.MIXTRAL_8X7B
model = B.random_model(args, "int8", dev)
engine = Engine(model, B.NullTokenizer(args.vocab_size), max_batch_size=1, max_seq_len=8448, compile=True)
prompt = [B.synthetic_prompt(5, args.vocab_size)]
B.time_generate(engine, prompt, 4)
tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
pos = torch.full((1, 1), 105, dtype=torch.int64, device=dev)
for _ in range(5):
    engine._decode(tok, pos)
sustain(f"decode tok/s {NAME}", lambda: engine._decode(tok, pos), (1, 40), seconds=4.0)
sustain(f"decode tok/s {NAME} again", lambda: engine._decode(tok, pos), (1, 40), seconds=4.0)
time.sleep(0.5); smi.terminate(); time.sleep(0.2)
rows = []
for line in open(smi_path):
    p = [s.strip() for s in line.split(",")]
    try:
        t = time.mktime(time.strptime(p[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + p[0].split(".")[1])
        rows.append((t, float(p[1]), float(p[2]), p[3]))
    except Exception:
        pass
for label, a, b in marks:
    sel = [r for r in rows if a + 1.2 <= r[0] <= b]
    if sel:
        print(f"  {label:28} power {statistics.mean(r[2] for r in sel):6.0f} W  sm clock {statistics.mean(r[1] for r in sel):6.0f} MHz  "
              f"capped {sum(r[3] != '0x0000000000000000' for r in sel)}/{len(sel)}")
