"""Session 38: where the benchmark's decode time goes between steps. One CUDA event on the main stream after
each step's put (the step's graph and its state copy), over a 200-token generate as the benchmark times it;
compare the events' intervals with the benchmark's (new_tokens - 1) / (total - ttft)."""
import statistics
import sys
import time

import torch

sys.path.insert(0, "scripts")
import benchmark as b  # noqa: E402
from gpt_fast_mixtral import generate as g  # noqa: E402

device = torch.device("cuda")
torch.manual_seed(0)
args = b.CONFIGS["mixtral-8x7b"]
model = b.random_model(args, "int8", device, None)
engine = g.Engine(model, b.NullTokenizer(args.vocab_size), max_batch_size=1, max_seq_len=2048, compile=True)
prompt = [b.synthetic_prompt(5, args.vocab_size, 0)]
b.time_generate(engine, prompt, 4)
events, host = [], []
original = g._StepStates.put


def put(self, state, tokens=None):
    kept = original(self, state, tokens)
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    events.append(e)
    host.append(time.perf_counter())
    return kept


g._StepStates.put = put
for run in range(3):
    events.clear(); host.clear()
    total, ttft = b.time_generate(engine, prompt, 200)
    torch.cuda.synchronize()
    gaps = [a.elapsed_time(c) * 1000 for a, c in zip(events, events[1:])]  # us; gaps[0]: prefill state -> step 1
    steps = gaps[1:]
    rate = 199 / (total - ttft)
    print(f"run {run}: benchmark rate {rate:.1f} tok/s = {1e6 / rate:.1f} us a token; events {len(events)}: "
          f"step median {statistics.median(steps):.1f} mean {statistics.mean(steps):.1f} us "
          f"(first 3 {[round(s, 1) for s in steps[:3]]}, last 3 {[round(s, 1) for s in steps[-3:]]}, max {max(steps):.1f}); "
          f"sum of steps 2..{len(events) - 1} {sum(steps) / 1000:.2f} ms against total - ttft {(total - ttft) * 1000:.2f} ms; "
          f"put-to-put on the host median {statistics.median([y - x for x, y in zip(host[1:], host[2:])]) * 1e6:.1f} us")
