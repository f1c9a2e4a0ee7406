"""Time the int8 linear kernel (kernels/linear.py) at Mixtral-8x7B's decode shapes against what
torch.compile makes of the plain dequantise-and-matmul (the path it replaces), in one GPU call.

    python benchmarks/sweep_linear.py [--tokens 1 8]
Prints microseconds per call and the bandwidth of the weight bytes read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from gpt_fast_mixtral.kernels.linear import LinearConfig, int8_linear, reference_int8_linear  # noqa: E402

SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "head": (32000, 4096)}
CONFIGS = {
    "default": LinearConfig(),
    "nomagic": LinearConfig(int8_magic=False),
    "n16_k512": LinearConfig(gemv_block_n=16, gemv_block_k=512),
    "n4_k1024": LinearConfig(gemv_block_n=4, gemv_block_k=1024),
    "n4_k2048_w8": LinearConfig(gemv_block_n=4, gemv_block_k=2048, gemv_warps=8),
    "n2_k2048": LinearConfig(gemv_block_n=2, gemv_block_k=2048),
    "n32_k256": LinearConfig(gemv_block_n=32, gemv_block_k=256),
    "w8": LinearConfig(gemv_warps=8, tile_warps=8),
    "w2_k256": LinearConfig(gemv_warps=2, gemv_block_k=256),
    "t64": LinearConfig(tile_block_n=64, tile_block_k=128),
    "t16": LinearConfig(tile_block_n=16, tile_block_k=512),
    # persistent grids for one token (session 3, unmeasured): a multiple of the 132 SMs
    "n4_p528": LinearConfig(gemv_programs=528),
    "n4_p1056": LinearConfig(gemv_programs=1056),
    "n2_p1056": LinearConfig(gemv_block_n=2, gemv_programs=1056),
    "n8_p528_k512": LinearConfig(gemv_block_n=8, gemv_block_k=512, gemv_programs=528),
}


def plain(x, weight, scales):
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8])
    options = parser.parse_args()
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config

    inductor_config.coordinate_descent_tuning = True
    compiled = torch.compile(plain, dynamic=False)
    rows = []
    for name, (n, k) in SHAPES.items():
        # Copies enough to overflow the 50 MB L2 (a decode step reads each weight once, from memory).
        copies = max(2, -(-200_000_000 // (n * k)))
        weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
        scales = torch.rand(n, device="cuda", dtype=torch.bfloat16) * 1e-3
        for tokens in options.tokens:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            expected = reference_int8_linear(x, weights[0], scales)

            def each(fn, x=x, weights=weights, scales=scales):
                return [fn(x, weight, scales) for weight in weights][0]

            calls = {label: (lambda c=config, each=each: each(lambda *a: int8_linear(*a, c)))
                     for label, config in CONFIGS.items()}
            calls["inductor"] = lambda each=each: each(compiled)
            for label, call in calls.items():
                try:
                    got = call()
                    error = ((got.float() - expected).norm() / expected.norm()).item()
                    ms = triton.testing.do_bench_cudagraph(call, rep=100) / copies
                except Exception as failure:  # a tile config the compiler rejects
                    print(f"{name} N={tokens} {label}: failed {type(failure).__name__}: {failure}"[:200])
                    continue
                rows.append((name, tokens, label, ms * 1e3, n * k / (ms * 1e-3) / 1e12, error))
    print(f"{'shape':6} {'N':>3} {'config':10} {'us':>8} {'TB/s':>6} {'rel.err':>8}")
    for name, tokens, label, us, tbs, error in rows:
        print(f"{name:6} {tokens:>3} {label:10} {us:8.1f} {tbs:6.2f} {error:8.1e}")


if __name__ == "__main__":
    main()
