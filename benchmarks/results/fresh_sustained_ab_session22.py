"""Session 22 archive (run from the repository root with PYTHONPATH=.; nvidia-h200, torch 2.11.0+cu130):
PYTHONPATH=. python3 benchmarks/results/fresh_sustained_ab_session22.py [--moe-config ...]. The down-half2 runs
ran in a copy of 37aa5bf with down_half2_session20.patch applied; log: h200_s22d_down_half2_fresh_sustained.log.
A/B of the pure decode step (position 105): 'fresh' = batches of 100 replays with 1 s idle between
(below the power cap), 'sustained' = 5 s back to back (at the cap on H200s), with power and clock."""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.gpu_telemetry import GpuTelemetry, gpu_id

def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1, 1), 123, dtype=torch.int64, device=dev)
    pos = torch.full((1, 1), 105, dtype=torch.int64, device=dev)
    for _ in range(5):
        engine._decode(tok, pos)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    def batch(n):
        e0.record()
        for _ in range(n):
            engine._decode(tok, pos)
        e1.record(); torch.cuda.synchronize()
        return n * 1e3 / e0.elapsed_time(e1)
    fresh = []
    for _ in range(10):
        time.sleep(1.0)
        fresh.append(batch(100))
    time.sleep(2.0)
    tel = GpuTelemetry.start(gpu_id(dev))
    t0 = time.time(); sus = []
    while time.time() - t0 < 5.0:
        if time.time() - t0 > 2.5:
            with tel.window():
                sus.append(batch(40))
        else:
            batch(40)
    tel.stop(); s = tel.summary()
    print(f"AB {os.environ.get('NAME')}: fresh {statistics.median(fresh):.1f} (min {min(fresh):.1f} max {max(fresh):.1f})"
          f"  sustained {statistics.median(sus):.1f}  power {s.get('power_w')} W clock {s.get('sm_clock_mhz')} capped {s.get('power_capped_share')}", flush=True)

benchmark.profile_kernels = measure
sys.argv = ["benchmark.py", "--precision", "int8", "--batch-size", "1", "--runs", "1", "--new-tokens", "20",
            "--ttft-lengths", "--profile"] + sys.argv[1:]
sys.exit(benchmark.main())
