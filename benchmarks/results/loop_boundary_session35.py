"""Session 35 archive: what a generate-loop step costs outside its graph (between two steps, the argmax, the head).
Run by loop_ab_session35.sh; S35_MAIN_D2H=1 puts the host copy back on the main stream (gpt_fast_mixtral.generate._StepStates)."""
import sys, statistics
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
import os
if os.environ.get("S35_MAIN_D2H") == "1":
    from gpt_fast_mixtral import generate as G
    def put(self, state, tokens=None):
        turn, self._turn = self._turn, 1 - self._turn
        kept = self._states[turn]
        kept.copy_(state)
        if tokens is not None:
            kept[:, 0].copy_(tokens)
        self._host[turn].copy_(kept, non_blocking=True)
        self._copied[turn].record()
        self._pending.append(turn)
        return kept
    G._StepStates.put = put
    print("main-stream D2H")

def loop_profile(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    from torch.profiler import ProfilerActivity, profile
    benchmark.time_generate(engine, prompt, 60)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        benchmark.time_generate(engine, prompt, 60)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    iv = sorted([(e.name, e.time_range.start, e.time_range.end) for e in kernels], key=lambda i: i[1])
    # steps: from one argmax kernel to the next
    am = [i for i, k in enumerate(iv) if "argmax" in k[0]]
    print(f"{len(am)} argmax kernels")
    gaps = {}
    for a, b in zip(am[10:-5], am[11:-4]):
        # kernels after argmax a until the first gate_up of the next step
        seq = []
        j = a
        while j < b and "_linear_kernel" not in iv[j + 1][0] and "gate_up" not in iv[j + 1][0]:
            j += 1
            seq.append(j)
        prev_end = iv[a][2]
        for k, j in enumerate(seq):
            name, s, e = iv[j]
            gaps.setdefault((k, name[:60]), []).append((s - prev_end, e - s))
            prev_end = e
        gaps.setdefault((99, "argmax itself"), []).append((iv[a][1] - iv[a - 1][2], iv[a][2] - iv[a][1]))
        gaps.setdefault((98, "step (argmax to argmax)"), []).append((0.0, iv[b][2] - iv[a][2]))
        gaps.setdefault((97, "head (kernel before argmax)"), []).append((iv[a - 1][1] - iv[a - 2][2], iv[a - 1][2] - iv[a - 1][1]))
    print("between steps: (order, kernel): median gap before, median duration, calls")
    for key in sorted(gaps):
        vals = gaps[key]
        print(f"  {key[0]:3d} {key[1]:60s} gap {statistics.median(v[0] for v in vals):7.2f} dur {statistics.median(v[1] for v in vals):8.2f}  n={len(vals)}")
    print(benchmark.format_critical_path(benchmark.critical_path([(n, a, b) for n, a, b in iv]), 60, "step (60-token generate)", rows=14))

benchmark.profile_kernels = loop_profile
sys.argv = ["benchmark.py"] + sys.argv[1:]
sys.exit(benchmark.main())
