"""The decode step's GPU time replayed back to back (no host loop), against the generate loop's rate; and the
critical path of pure replays. Run as benchmark.py with --profile."""
import sys, statistics
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2] / "scripts"), str(Path(__file__).resolve().parents[2])]
import torch
import benchmark

def step_profile(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    pos = torch.full((1, 1), 105, dtype=torch.int64, device=dev)
    for _ in range(5):
        engine._decode(tok, pos)
    torch.cuda.synchronize()
    n = 100
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    res = []
    for _ in range(3):
        a.record()
        for _ in range(n):
            engine._decode(tok, pos)
        b.record(); torch.cuda.synchronize()
        res.append(a.elapsed_time(b) * 1e3 / n)
    print(f"back-to-back decode step: {[round(r, 1) for r in res]} us -> {1e6 / statistics.median(res):.1f} tok/s")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine._decode(tok, pos)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.name, e.time_range.start, e.time_range.end) for e in kernels]
    print(benchmark.format_critical_path(benchmark.critical_path(intervals), 20, "pure decode step", rows=30))

benchmark.profile_kernels = step_profile
sys.argv[0] = "benchmark.py"
sys.exit(benchmark.main())
