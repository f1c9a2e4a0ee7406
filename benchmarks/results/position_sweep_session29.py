# Session 29. Run on a GPU (the variants of attention_variants_session29.patch take ATT_* environment variables):
#   NAME=x POS=105,300,1000,4000,8000 PYTHONPATH=. python3 benchmarks/results/position_sweep_session29.py
"""Pure decode step at several positions (fresh: 1 s idle before each 100-replay batch): tok/s and the
attention kernel's critical-path share."""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]  # run from the repository root
import torch
import benchmark

def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    for P in [int(p) for p in os.environ.get("POS", "105").split(",")]:
        pos = torch.full((1, 1), P, dtype=torch.int64, device=dev)
        for _ in range(5):
            engine._decode(tok, pos)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        res = []
        for _ in range(5):
            time.sleep(1.0)
            e0.record()
            for _ in range(100):
                engine._decode(tok, pos)
            e1.record(); torch.cuda.synchronize()
            res.append(100 * 1e3 / e0.elapsed_time(e1))
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine._decode(tok, pos)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        intervals = sorted([(e.name, e.time_range.start, e.time_range.end) for e in kernels], key=lambda i: i[2])
        shares = benchmark.critical_path(intervals)
        att = {k: statistics.median(v[0]) for k, v in shares.items() if "attention" in k or "preloaded" in k}
        print(f"POS {os.environ.get('NAME')} {P}: {statistics.median(res):.1f} tok/s  " +
              "  ".join(f"{k[:22]} {v:.2f}" for k, v in att.items()), flush=True)

benchmark.profile_kernels = measure
sys.argv = ["benchmark.py", "--precision", "int8", "--batch-size", "1", "--runs", "1", "--new-tokens", "20",
            "--ttft-lengths", "--profile"] + sys.argv[1:]
sys.exit(benchmark.main())
