"""Session 34 (h200_s34_ttft_ab.log): time to first token of the int8 benchmark model with the prefill gate_up
tile of the float16 path new (128 x 64, 4 warps: MoEConfig.grouped_fp16_gate_up_*) and old (128 x 128, 8 warps),
in one process, alternating new / old / new / old, 3 samples each. Command: PYTHONPATH=. python3 <this file>"""
import dataclasses, statistics, sys, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark
from gpt_fast_mixtral.kernels import moe as M

NEW = M.DEFAULT_CONFIG
OLD = dataclasses.replace(NEW, grouped_fp16_gate_up_block_n=128, grouped_fp16_gate_up_warps=8)
done = []


def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if done:
        return
    done.append(1)
    rows = []
    for length in [512, 2048, 8192]:
        p = [benchmark.synthetic_prompt(length, 32000)]
        res = {"new": [], "old": []}
        for name in ["new", "old", "new", "old"]:
            M.DEFAULT_CONFIG = NEW if name == "new" else OLD
            benchmark.time_generate(engine, p, 1)
            time.sleep(0.5)
            res[name] += [benchmark.time_generate(engine, p, 1)[1] * 1e3 for _ in range(3)]
        rows.append((length, statistics.median(res["new"]), statistics.median(res["old"]), res))
        print(length, {k: [round(v, 1) for v in vs] for k, vs in res.items()}, flush=True)
    M.DEFAULT_CONFIG = NEW
    print("\nTTFT ms (median of 6, alternating)  new 128x64 w4 | old 128x128 w8")
    for length, n, o, _ in rows:
        print(f"{length:6d}  {n:8.1f}  {o:8.1f}  ({(o - n) / o * 100:+.1f}%)")


benchmark.profile_kernels = measure
sys.argv = ["benchmark.py", "--precision", "int8", "--batch-size", "1", "--runs", "1", "--new-tokens", "8",
            "--ttft-lengths", "--profile", "--no-compile"]
benchmark.main()
