"""Session 22 archive: PYTHONPATH=. python3 benchmarks/results/multi_step_graph_session22.py (nvidia-h200,
torch 2.11.0+cu130, code of 5102ab2). Result in h200_s22_multi_step_graph.log: no gain from N-step graphs.

A: Engine.generate (reduce-overhead step, host bookkeeping between steps), 199 decode steps.
B: the engine's compiled step replayed back to back at position 105 (no loop).
C[n]: the step compiled without cudagraphs, bookkeeping inside (tokens, positions mutated), n steps
   captured in one torch.cuda.CUDAGraph, replayed with the generate loop's copy / wait pattern.
"""
import os, sys, time, statistics
sys.path[:0] = ["scripts", "."]
import torch
import benchmark as B
from gpt_fast_mixtral.generate import Engine

NS = [int(n) for n in os.environ.get("NS", "1,2,4,8").split(",")]
dev = torch.device("cuda")
args = B.MIXTRAL_8X7B
t0 = time.perf_counter()
model = B.random_model(args, os.environ.get("PREC", "int8"), dev)
engine = Engine(model, B.NullTokenizer(args.vocab_size), max_batch_size=1, max_seq_len=8448, compile=True)
prompt = [B.synthetic_prompt(5, args.vocab_size)]
B.time_generate(engine, prompt, 4)
print(f"build+compile A {time.perf_counter() - t0:.0f} s", flush=True)


def gen_rate():
    total, ttft = B.time_generate(engine, prompt, 200)
    return 199 / (total - ttft)


res = {}
res["A loop"] = [gen_rate() for _ in range(3)]
tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
pos = torch.full((1, 1), 105, dtype=torch.int64, device=dev)
ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(5):
    engine._decode(tok, pos)
r = []
for _ in range(3):
    ev0.record()
    for _ in range(199):
        engine._decode(tok, pos)
    ev1.record(); torch.cuda.synchronize()
    r.append(199e3 / ev0.elapsed_time(ev1))
res["B pure@105"] = r


def step_mut(tokens, positions):
    logits = engine.model(tokens, positions)[:, -1].float()
    next_tokens = logits.argmax(dim=-1)
    tokens.copy_(next_tokens[:, None])
    positions.add_(1)
    return next_tokens


t0 = time.perf_counter()
step = torch.compile(step_mut, fullgraph=True)
stok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
spos = torch.full((1, 1), 5, dtype=torch.int64, device=dev)
out = torch.zeros(max(NS), 1, dtype=torch.int64, device=dev)


def body(n):
    for k in range(n):
        out[k].copy_(step(stok, spos))


s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        body(2)
torch.cuda.current_stream().wait_stream(s)
torch.cuda.synchronize()
print(f"compile C {time.perf_counter() - t0:.0f} s", flush=True)
pool = torch.cuda.graph_pool_handle()
graphs = {}
for n in NS:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        body(n)
    graphs[n] = g
torch.cuda.synchronize()
hosts = [torch.empty(max(NS), 1, dtype=torch.int64, pin_memory=True) for _ in range(2)]
evs = [torch.cuda.Event() for _ in range(2)]


def manual_rate(n, total=200):
    spos.fill_(5); stok.fill_(123)
    torch.cuda.synchronize()
    reps = total // n
    start = time.perf_counter()
    got = []
    for rep in range(reps):
        graphs[n].replay()
        hosts[rep % 2][:n].copy_(out[:n], non_blocking=True)
        evs[rep % 2].record()
        if rep:
            evs[(rep - 1) % 2].synchronize()
            got += hosts[(rep - 1) % 2][:n].tolist()
    torch.cuda.synchronize()
    return reps * n / (time.perf_counter() - start)


for n in NS:
    manual_rate(n, 16)
for rep in range(3):
    for n in NS:
        res.setdefault(f"C n={n}", []).append(manual_rate(n))
# same tokens? greedy from the same start: compare C n=1 with the engine's loop
spos.fill_(5); stok.fill_(prompt[0][-1])
print("table (tok/s, 3 runs, median)")
for k, v in res.items():
    print(f"  {k:14} {statistics.median(v):7.1f}   {[round(x, 1) for x in v]}")
