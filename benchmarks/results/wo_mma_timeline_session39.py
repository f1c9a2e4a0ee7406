"""Session 39: when the tensor-core wo's programs start, pass their wait and end, against each other."""
import dataclasses
import statistics
import sys

import torch

sys.path.insert(0, "scripts")
import benchmark as b  # noqa: E402
from gpt_fast_mixtral import generate as g, quantize  # noqa: E402
from gpt_fast_mixtral.kernels import linear, pdl  # noqa: E402

quantize.WeightOnlyInt8Linear.preload_config = dataclasses.replace(linear.PRELOAD_CONFIG, gemv_preload_mma=True)
device = torch.device("cuda")
torch.manual_seed(0)
args = b.CONFIGS["mixtral-8x7b"]
model = b.random_model(args, "int8", device, None)
pdl.TIMELINE_MMA = {layer.attention.wo.weight.data_ptr(): torch.zeros(256, 4, dtype=torch.int64, device=device)
                    for layer in model.layers}
engine = g.Engine(model, b.NullTokenizer(args.vocab_size), max_batch_size=1, max_seq_len=2048, compile=True)
prompt = [b.synthetic_prompt(5, args.vocab_size, 0)]
b.time_generate(engine, prompt, 4)
for n in (8, 100):
    total, ttft = b.time_generate(engine, prompt, n)
    torch.cuda.synchronize()
    print(f"n={n}: {(n - 1) / (total - ttft):.1f} tok/s")
    stats = []
    for L, layer in enumerate(model.layers):
        t = pdl.TIMELINE_MMA[layer.attention.wo.weight.data_ptr()].cpu()
        start, wait, end, sm = t[:, 0], t[:, 1], t[:, 2], t[:, 3]
        w0 = int(wait.min())
        late = int((start > w0).sum())
        per_sm = torch.bincount(sm, minlength=132)
        stats.append(((int(start.max()) - w0) / 1000, late, (int(wait.max()) - w0) / 1000, (int(end.max()) - w0) / 1000,
                      float((end - wait).float().median()) / 1000, (w0 - int(start.min())) / 1000,
                      int((per_sm == 1).sum()), int((per_sm == 2).sum()), int((per_sm == 3).sum()), int((per_sm == 0).sum())))
        if L in (0, 15, 31):
            print(f"  L{L}: last start {stats[-1][0]:+.2f} us after the first wait return; programs started after it {late}; "
                  f"last wait return {stats[-1][2]:+.2f}; last end {stats[-1][3]:+.2f}; median end - wait {stats[-1][4]:.2f}; "
                  f"first start {stats[-1][5]:.2f} us before the first wait return; SMs with 1/2/3/0 programs "
                  f"{stats[-1][6]}/{stats[-1][7]}/{stats[-1][8]}/{stats[-1][9]}")
    cols = list(zip(*stats))
    print("  medians over layers: last start %.2f, late programs %.0f, last wait %.2f, last end %.2f, end-wait %.2f, "
          "first start lead %.2f" % tuple(statistics.median(c) for c in cols[:6]))
