# Session 29. Needs attention_phase_trace_session29.patch applied (git apply). Run on a GPU:
#   POS=40,105,200 PYTHONPATH=. python3 benchmarks/results/attention_phase_trace_session29.py --precision int8 --batch-size 1 --runs 1 --new-tokens 20 --ttft-lengths --profile
"""Pure decode-step replays with the trace29.patch stamps: per-phase mean cycles of the attention and wo kernels."""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]  # run from the repository root
import torch
import benchmark
from gpt_fast_mixtral.kernels import attention, linear
attention.TRACE = torch.zeros(8, dtype=torch.int32, device="cuda")
linear.TRACE = torch.zeros(8, dtype=torch.int32, device="cuda")

def step_profile(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    for P in [int(p) for p in os.environ.get("POS", "105").split(",")]:
        pos = torch.full((1, 1), P, dtype=torch.int64, device=dev)
        for _ in range(5):
            engine._decode(tok, pos)
        torch.cuda.synchronize()
        time.sleep(1.0)
        attention.TRACE.zero_(); linear.TRACE.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            engine._decode(tok, pos)
        b.record(); torch.cuda.synchronize()
        us = a.elapsed_time(b) * 1e3 / 50
        try:
            clk = torch.cuda.clock_rate(dev)
        except Exception:
            clk = 1980
        at = attention.TRACE.tolist(); wo = linear.TRACE.tolist()
        def fmt(t, names):
            n = max(t[7], 1)
            return "  ".join(f"{nm} {t[i] / n / clk:.2f}" for i, nm in enumerate(names))
        print(f"POS {P}: step {us:.1f} us ({1e6 / us:.1f} tok/s) clock {clk} MHz  programs: attn {at[7]} wo {wo[7]}")
        print("  attention us:", fmt(at, ["wait", "q", "tile1", "loop", "newkv", "out"]))
        print("  wo us:       ", fmt(wo, ["wait", "x", "dot", "store"]))

benchmark.profile_kernels = step_profile
sys.argv = ["benchmark.py"] + sys.argv[1:]
sys.exit(benchmark.main())
