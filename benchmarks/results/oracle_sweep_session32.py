"""Session 32: the router's oracles (h200_s32_route_oracles.log). The measurement of oracle_sweep_session31.py
(GEN=n: n fresh 200-token decodes from the benchmark's 5-token prompt; POS: pure steps at those positions, fresh),
with route_oracles_session32.patch applied (applies to 7e6e81b). The switch RT=1..6 picks the variant (the patch's
header says what each does); this script makes the buffers the patch reads before any graph is captured: the
fixed routing (model._RT_FIXED) and the routing programs' partials, ids and rows (linear._ROUTE_BUFS).
Command: NAME=x RT=n GEN=3 POS=105 PYTHONPATH=. python3 benchmarks/results/oracle_sweep_session32.py"""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.kernels import attention as A
from gpt_fast_mixtral import model as _model
from gpt_fast_mixtral.kernels import linear as _L
_dev = torch.device("cuda", 0)
_model._RT_FIXED[_dev] = (torch.tensor([[i % 8, (i + 3) % 8] for i in range(32)], dtype=torch.int64, device=_dev),
                          torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16, device=_dev))
_L._ROUTE_BUFS[_dev] = (torch.randn(64, device=_dev), torch.zeros(2, dtype=torch.int64, device=_dev),
                        torch.randn(16, 4096, device=_dev) / 64)

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
