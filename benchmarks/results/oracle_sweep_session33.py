"""Session 33 (from session 31's): timing oracles and attention variants at the benchmark's positions (h200_s31_oracles.log).
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
if os.environ.get("GU_FIX") == "1":
    _M._FIXED[torch.device("cuda", 0)] = torch.arange(64, device="cuda:0") % 8

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

def hit_rate(engine, prompt, steps=150):
    import torch.nn.functional as F
    from gpt_fast_mixtral.model import TransformerBlock
    orig = TransformerBlock.residual_norm_route
    rec = {}
    def wrapped(self, x, attended):
        h, normed, routing = orig(self, x, attended)
        if routing is not None and x.shape[1] == 1:
            g = self.block_sparse_moe.gate.weight
            pred = F.linear(self.ffn_norm(x), g).float().reshape(-1, g.shape[0]).topk(2, dim=-1).indices
            act = routing[1].reshape(-1, 2)
            hits = (pred[:, :, None] == act[:, None, :]).any(-1).sum().item()
            order = (pred == act).all(-1).sum().item()
            r = rec.setdefault(id(self), [0, 0, 0])
            r[0] += hits; r[1] += 2 * act.shape[0]; r[2] += order
        return h, normed, routing
    TransformerBlock.residual_norm_route = wrapped
    dev = engine.device
    model = engine.model
    toks = torch.tensor(prompt, device=dev)
    n = toks.shape[1]
    with torch.no_grad():
        logits = model(toks, torch.arange(n, device=dev)[None], kv_len=n)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            logits = model(tok, torch.full((1, 1), n + i, device=dev))
            tok = logits[:, -1].argmax(-1, keepdim=True)
    TransformerBlock.residual_norm_route = orig
    per_layer = [rec[id(l)] for l in model.layers]
    rates = [h / t for h, t, _ in per_layer]
    print("HIT per layer: " + " ".join(f"{r:.2f}" for r in rates), flush=True)
    print(f"HIT slots {sum(h for h,_,_ in per_layer) / sum(t for _,t,_ in per_layer):.3f}  "
          f"ordered-both {sum(o for *_, o in per_layer) / (sum(t for _,t,_ in per_layer) / 2):.3f}", flush=True)

def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    if os.environ.get("HIT") == "1":
        hit_rate(engine, prompt)
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
