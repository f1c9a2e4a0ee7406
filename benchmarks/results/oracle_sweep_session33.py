"""Session 33 (h200_s33_guess_preload.log, h200_s33_attention_stages.log): session 31's sweep
(oracle_sweep_session31.py: GEN / POS and its switches, plus guess_preload_session33.patch's GU_FIX / GU_PRE)
and, with HIT=1, the share of routed experts that top-2 of gate(ffn_norm(x)) on the block's input x picks
(the benchmark's random model, 150 greedy steps run eagerly, per layer). The session ran a copy of session
31's script with `hit_rate` added; it is kept as this wrapper, which runs the same code.
Command: NAME=x [HIT=1 | GEN=3 POS=105] PYTHONPATH=. [switches] python3 benchmarks/results/oracle_sweep_session33.py"""
import os
import runpy
import sys
from pathlib import Path

sys.path[:0] = ["scripts", "."]
import torch
import torch.nn.functional as F

import benchmark
from gpt_fast_mixtral.model import TransformerBlock


def hit_rate(engine, prompt, new_tokens=None, label="", show=True, per=1, steps=150):
    if "prefill" in label:
        return
    orig = TransformerBlock.residual_norm_route
    rec = {}

    def wrapped(self, x, attended):
        h, normed, routing = orig(self, x, attended)
        if routing is not None and x.shape[1] == 1:
            g = self.block_sparse_moe.gate.weight
            pred = F.linear(self.ffn_norm(x), g).float().reshape(-1, g.shape[0]).topk(2, dim=-1).indices
            act = routing[1].reshape(-1, 2)
            r = rec.setdefault(id(self), [0, 0, 0])
            r[0] += (pred[:, :, None] == act[:, None, :]).any(-1).sum().item()
            r[1] += 2 * act.shape[0]
            r[2] += (pred == act).all(-1).sum().item()
        return h, normed, routing

    TransformerBlock.residual_norm_route = wrapped
    dev, model = engine.device, engine.model
    toks = torch.tensor(prompt, device=dev)
    n = toks.shape[1]
    with torch.no_grad():
        tok = model(toks, torch.arange(n, device=dev)[None], kv_len=n)[:, -1].argmax(-1, keepdim=True)
        for i in range(steps):
            tok = model(tok, torch.full((1, 1), n + i, device=dev))[:, -1].argmax(-1, keepdim=True)
    TransformerBlock.residual_norm_route = orig
    per_layer = [rec[id(layer)] for layer in model.layers]
    print("HIT per layer: " + " ".join(f"{h / t:.2f}" for h, t, _ in per_layer), flush=True)
    hits, total, ordered = (sum(r[i] for r in per_layer) for i in range(3))
    print(f"HIT slots {hits / total:.3f}  ordered-both {ordered / (total / 2):.3f}", flush=True)


_main = benchmark.main


def main():
    if os.environ.get("HIT") == "1":  # session 31's script has installed its GEN / POS measure by now
        benchmark.profile_kernels = hit_rate
    return _main()


benchmark.main = main
runpy.run_path(str(Path(__file__).with_name("oracle_sweep_session31.py")), run_name="__main__")
