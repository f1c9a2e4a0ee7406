"""Session 30: the attention's chunk policy at the benchmark's positions (h200_s30_attention_chunks.log).
MINC / TGT / SINGLE override min_chunk / target_programs / single_span of every decode attention call
(SINGLE against the final code; calls s30c ran the same through a temporary ATT_SINGLE switch in the kernel).
POS: pure-step positions (fresh, 1 s idle before each 100-replay batch); GEN=n: also n fresh 200-token
decodes from the benchmark's 5-token prompt, as scripts/benchmark.py times them.
Command: NAME=x GEN=3 POS=105,150,200 PYTHONPATH=. python3 benchmarks/results/chunk_policy_sweep_session30.py"""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.kernels import attention as A

_orig = A._attend
def _attend(*a, **k):
    a = list(a)
    if os.environ.get("MINC"):
        a[11] = int(os.environ["MINC"])
    if os.environ.get("TGT"):
        a[10] = int(os.environ["TGT"])
    if os.environ.get("SINGLE"):
        a[12] = int(os.environ["SINGLE"])
    return _orig(*a, **k)
A._attend = _attend
NAME = os.environ.get("NAME")

def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    gens = []
    for _ in range(int(os.environ.get("GEN", "0"))):
        time.sleep(1.0)
        total, ttft = benchmark.time_generate(engine, prompt, 200)
        gens.append(199 / (total - ttft))
    if gens:
        print(f"GEN {NAME}: median {statistics.median(gens):.1f}  " + " ".join(f"{g:.1f}" for g in gens), flush=True)
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    for P in [int(p) for p in os.environ.get("POS", "105").split(",") if p]:
        pos = torch.full((1, 1), P, dtype=torch.int64, device=dev)
        for _ in range(5):
            engine._decode(tok, pos)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        res = []
        for _ in range(3):
            time.sleep(1.0)
            e0.record()
            for _ in range(100):
                engine._decode(tok, pos)
            e1.record(); torch.cuda.synchronize()
            res.append(100 * 1e3 / e0.elapsed_time(e1))
        print(f"POS {NAME} {P}: {statistics.median(res):.1f} tok/s", flush=True)

benchmark.profile_kernels = measure
sys.argv = ["benchmark.py", "--precision", "int8", "--batch-size", "1", "--runs", "1", "--new-tokens", "20",
            "--ttft-lengths", "--profile"] + sys.argv[1:]
sys.exit(benchmark.main())
