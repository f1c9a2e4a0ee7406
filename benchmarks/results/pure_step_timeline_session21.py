"""Session 21 archive: needs attention_early_tiles_session21.patch applied (EARLY_TILES / HOIST_NEW are its switches). Pure decode-step replays at position POS (no host loop): step time, critical path, and one layer's
kernel timeline (start / end relative to the previous kernel's end). Run with battn.py's switches."""
import os, sys, statistics
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.kernels import attention
attention.EARLY_TILES = int(os.environ.get("EARLY", "1"))
attention.HOIST_NEW = os.environ.get("HOIST") == "1"

def step_profile(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    pos = torch.full((1, 1), int(os.environ.get("POS", "105")), dtype=torch.int64, device=dev)
    for _ in range(5):
        engine._decode(tok, pos)
    torch.cuda.synchronize()
    n = 100
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    res = []
    for _ in range(5):
        a.record()
        for _ in range(n):
            engine._decode(tok, pos)
        b.record(); torch.cuda.synchronize()
        res.append(a.elapsed_time(b) * 1e3 / n)
    print(f"PURE {os.environ.get('NAME')}: {[round(r, 1) for r in res]} us -> {1e6 / statistics.median(res):.1f} tok/s")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            engine._decode(tok, pos)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted([(e.name, e.time_range.start, e.time_range.end) for e in kernels], key=lambda i: i[2])
    print(benchmark.format_critical_path(benchmark.critical_path(intervals), 20, "pure decode step", rows=12))
    # one layer in the middle of step 10: find the 10th occurrence of the attention kernel's 16th call
    att = [i for i, k in enumerate(intervals) if "attention" in k[0]]
    mid = att[10 * 32 + 16]
    print("timeline (us): name, start - prev end, end - prev end, duration")
    for i in range(mid - 4, mid + 8):
        name, s, e = intervals[i]
        pe = intervals[i - 1][2]
        print(f"  {name[:50]:50} {s - pe:8.2f} {e - pe:8.2f} {e - s:8.2f}")

benchmark.profile_kernels = step_profile
sys.argv = ["benchmark.py"] + sys.argv[1:]
sys.exit(benchmark.main())
