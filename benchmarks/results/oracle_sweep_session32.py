"""Session 32 (copy of oracle_sweep_session31.py, RT switches of route_oracles_session32.patch). Session 31: timing oracles and attention variants at the benchmark's positions (h200_s31_oracles.log).
Same measurement as chunk_policy_sweep_session30.py (GEN=n: n fresh 200-token decodes from the benchmark's
5-token prompt; POS: pure steps at those positions, fresh). With oracles_session31.patch applied (applies to
65b44ca), environment switches pick the variant: ATT_ORACLE=2 (the attention does nothing after its wait but
release wo and store zeros), ATT_ORACLE=1 (no cached tile after the first), ATT_WARPS, WO_PRE (wo's tiles loaded
before its wait), ATT_L1=n (the next n tiles' lines asked of L1 before the wait, the loop unpipelined),
ATT_LOOPST (the tile loop's stages), GU_FIX=1 (gate_up reads experts 0 and 1, a buffer made here before any
graph), GU_NOWAIT=1 (gate_up waits for the router only after its stores: a timing oracle, values wrong).
Command: NAME=x GEN=3 POS=105 PYTHONPATH=. [switches] python3 benchmarks/results/oracle_sweep_session31.py"""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.kernels import attention as A
from gpt_fast_mixtral.kernels import moe as _M
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
