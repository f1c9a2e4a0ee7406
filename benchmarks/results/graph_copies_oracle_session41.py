"""Session 41 oracle: what do the copies between decode graphs cost?
TREE: engine._decode (cudagraph trees, inputs copied each call) replayed back to back at position 105.
MANUAL: the same step compiled without cudagraphs, captured by hand with static inputs, replayed back to back;
MANUAL_INPLACE: the same, the step's next state copied into its own inputs inside the graph (a real loop)."""
import os, sys, statistics, time
sys.path[:0] = ["scripts", "."]
import torch
import benchmark

def rate(fn, n=200, reps=5):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        e0.record()
        for _ in range(n):
            fn()
        e1.record(); torch.cuda.synchronize()
        out.append(n * 1e3 / e0.elapsed_time(e1))
    return out

def measure(engine, prompt, new_tokens, label, show=True, per=1):
    if "prefill" in label:
        return
    dev = engine.device
    tok = torch.full((1,), 123, dtype=torch.int64, device=dev)
    pos = torch.full((1,), 105, dtype=torch.int64, device=dev)
    for _ in range(5):
        engine._decode(tok, pos)
    tree = rate(lambda: engine._decode(tok, pos))
    t0 = time.time()
    f = torch.compile(engine._step, fullgraph=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f(tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    print(f"compile without cudagraphs {time.time() - t0:.1f} s", flush=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        state, logits = f(tok, pos)
    g2 = torch.cuda.CUDAGraph()
    tok2 = tok.clone(); pos2 = pos.clone()
    with torch.cuda.graph(g2, pool=g.pool()):
        state2, logits2 = f(tok2, pos2)
        tok2.copy_(state2[0]); pos2.fill_(105)
    manual = rate(g.replay)
    inplace = rate(g2.replay)
    tree2 = rate(lambda: engine._decode(tok, pos))
    torch.cuda.synchronize()
    print(f"check: tree state {engine._decode(tok, pos)[0].tolist()} manual {state.tolist()}")
    for name, r in [("TREE", tree), ("MANUAL", manual), ("MANUAL_INPLACE", inplace), ("TREE again", tree2)]:
        print(f"ORACLE {name:16} median {statistics.median(r):.2f} tok/s  {[round(x, 1) for x in r]}", flush=True)

benchmark.profile_kernels = measure
sys.argv = ["benchmark.py", "--precision", "int8", "--batch-size", "1", "--runs", "3",
            "--ttft-lengths", "--profile"] + sys.argv[1:]
sys.exit(benchmark.main())
