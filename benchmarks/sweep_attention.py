"""Time one layer's decode attention at Mixtral-8x7B's shape (32 query heads, 8 kv heads, head_dim 128):
the length-aware kernel (kernels/attention.py) against SDPA with a mask over the whole static cache
(what the model ran before), for several filled lengths of an 8448-slot cache.

    python benchmarks/sweep_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from gpt_fast_mixtral.kernels.attention import decode_attention, reference_decode_attention  # noqa: E402


def main() -> None:
    heads, kv_heads, head_dim, slots = 32, 8, 128, 8448
    rows = []
    for batch in (1, 8):
        k = torch.randn(batch, kv_heads, slots, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        for length in (200, 2048, 8192):
            lengths = torch.full((batch,), length, device="cuda")
            mask = (torch.arange(slots, device="cuda") < lengths[:, None])[:, None, None, :]

            def sdpa(q=q, k=k, v=v, mask=mask):
                return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)

            def kernel(q=q, k=k, v=v, lengths=lengths):
                return decode_attention(q, k, v, lengths)

            expected = reference_decode_attention(q, k, v, lengths)
            for name, call in (("sdpa", sdpa), ("kernel", kernel)):
                got = call().float().reshape(expected.shape)
                error = ((got - expected).norm() / expected.norm()).item()
                us = triton.testing.do_bench_cudagraph(call, rep=100) * 1e3
                moved = 2 * batch * kv_heads * length * head_dim * 2
                rows.append((batch, length, name, us, moved / (us * 1e-6) / 1e12, error))
    print(f"{'B':>2} {'length':>6} {'impl':7} {'us':>8} {'TB/s (filled)':>13} {'rel.err':>8}")
    for batch, length, name, us, tbs, error in rows:
        print(f"{batch:>2} {length:>6} {name:7} {us:8.1f} {tbs:13.2f} {error:8.1e}")


if __name__ == "__main__":
    main()
