"""Decode and prefill benchmark against the memory-bandwidth ceiling (see ../shared/PERF.md).

Builds the model with random weights of the real shape directly on the GPU (default Mixtral-8x7B), or
loads a converted checkpoint; measures copy bandwidth in the same process; reports decode tok/s
(median of warm runs), time to first token per prompt length, peak memory and compile times; prints the
ceiling and the share of it; writes JSON (device, torch version, command) for benchmarks/results/.

    python scripts/benchmark.py --precision int8 --out benchmarks/results/h200_int8.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gpt_fast_mixtral.checkpoint import meta_model  # noqa: E402
from gpt_fast_mixtral.config import ModelArgs  # noqa: E402
from gpt_fast_mixtral.generate import Engine, SamplingParams  # noqa: E402
from gpt_fast_mixtral.quantize import quantize_int8  # noqa: E402

MIXTRAL_8X7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         intermediate_size=14336, num_experts=8, num_experts_per_tok=2)


class NullTokenizer:
    """Stands in for sentencepiece: the benchmark feeds token ids and never stops on EOS."""

    bos_id, eos_id = 1, -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError("the benchmark passes token ids")

    def piece_bytes(self, token_id: int) -> bytes:
        return b"x"


def random_model(args: ModelArgs, precision: str, device: str) -> torch.nn.Module:
    """Random weights of the real shape, made on the device (no 90 GB checkpoint needed)."""
    model = meta_model(args).to(torch.bfloat16)  # still on meta: float32 would not fit the GPU
    if precision == "int8":
        model = quantize_int8(model)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype == torch.int8:
                tensor.copy_(torch.randint(-127, 128, tensor.shape, generator=generator, device=device,
                                           dtype=torch.int8))
            elif name.endswith("scales"):
                tensor.fill_(0.02 / 64)
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0, 0.02, generator=generator)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def copy_bandwidth(device: str, gigabytes: float = 4.0) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    numel = int(gigabytes * 1e9 / 2)
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * numel * 2 / statistics.median(times[2:])


def bytes_per_token(args: ModelArgs, precision: str, batch: int = 1) -> float:
    """Weight bytes one decode step must read: attention + routed experts + head (PERF.md's count)."""
    weight_bytes = 1 if precision == "int8" else 2
    attention = args.dim * args.qkv_out_features + args.n_heads * args.head_dim * args.dim
    expert = 3 * args.dim * args.intermediate_size
    touched = args.num_experts * (1 - (1 - args.num_experts_per_tok / args.num_experts) ** batch)
    per_layer = attention + touched * expert
    return (args.n_layers * per_layer + args.vocab_size * args.dim) * weight_bytes


def time_generate(engine: Engine, prompt: list[list[int]], new_tokens: int) -> tuple[float, float]:
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(prompt)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = engine.generate(prompt, params)[0]
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return total, result.time_to_first_token_s


def profile_decode(engine: Engine, prompt: list[list[int]], steps: int = 20) -> None:
    """Print the GPU kernels of `steps` decode steps, most expensive first (CUPTI sees into CUDA graphs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        time_generate(engine, prompt, steps)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def run(options: argparse.Namespace) -> dict:
    device = "cuda"
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    build_start = time.perf_counter()
    if options.checkpoint_path:
        engine = Engine.from_checkpoint(options.checkpoint_path, device=device, dtype=torch.bfloat16,
                                        max_batch_size=options.batch_size, max_seq_len=options.max_seq_len,
                                        compile=not options.no_compile)
        args = engine.model.args
    else:
        args = MIXTRAL_8X7B
        model = random_model(args, options.precision, device)
        engine = Engine(model, NullTokenizer(args.vocab_size), max_batch_size=options.batch_size,  # type: ignore[arg-type]
                        max_seq_len=options.max_seq_len, compile=not options.no_compile)
    build_s = time.perf_counter() - build_start
    for module in engine.model.modules():
        if hasattr(module, "dense_max_tokens") and options.moe_impl == "gather":
            module.dense_max_tokens = module.fused_max_tokens = 0
        elif hasattr(module, "fused_max_tokens") and options.fused_max_tokens is not None:
            module.fused_max_tokens = options.fused_max_tokens
    prompt = [[1] + [100 + i for i in range(options.prompt_len - 1)] for _ in range(options.batch_size)]

    compile_start = time.perf_counter()
    time_generate(engine, prompt, 4)  # compiles (or loads from the FX graph cache) the decode step
    first_call_s = time.perf_counter() - compile_start
    decode_rates = []
    for _ in range(options.runs):
        total, ttft = time_generate(engine, prompt, options.new_tokens)
        decode_rates.append((options.new_tokens - 1) / (total - ttft))
    decode_tok_s = statistics.median(decode_rates)

    if options.profile:
        profile_decode(engine, prompt)

    ttft_ms = {}
    for length in options.ttft_lengths:
        if length + 2 > engine.max_seq_len:
            continue
        long_prompt = [[1] + [100 + (i % 30000) for i in range(length - 1)]]
        time_generate(engine, long_prompt, 1)
        samples = [time_generate(engine, long_prompt, 1)[1] for _ in range(3)]
        ttft_ms[str(length)] = round(1e3 * statistics.median(samples), 2)

    ceiling = bandwidth / bytes_per_token(args, options.precision, options.batch_size)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "precision": options.precision,
        "moe_impl": options.moe_impl,
        "compile": not options.no_compile,
        "batch_size": options.batch_size,
        "prompt_len": options.prompt_len,
        "new_tokens": options.new_tokens,
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "bytes_per_token_gb": round(bytes_per_token(args, options.precision, options.batch_size) / 1e9, 3),
        "ceiling_tok_s": round(ceiling * options.batch_size, 1),
        "decode_tok_s": round(decode_tok_s * options.batch_size, 1),
        "decode_tok_s_runs": [round(r * options.batch_size, 1) for r in decode_rates],
        "share_of_ceiling": round(decode_tok_s / ceiling, 3),
        "ttft_ms": ttft_ms,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "build_s": round(build_s, 1),
        "first_call_s (compile or cache load)": round(first_call_s, 1),
    }


def measure_compile_cache(options: argparse.Namespace) -> dict:
    """Run this benchmark's first call twice in fresh processes sharing one FX graph cache dir."""
    import tempfile

    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    command = [sys.executable, __file__, "--precision", options.precision, "--runs", "1", "--new-tokens", "8",
               "--ttft-lengths", "--max-seq-len", str(options.max_seq_len), "--json-only"]
    times = {}
    for label in ("cold", "warm"):
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        times[label] = json.loads(output.strip().splitlines()[-1])["first_call_s (compile or cache load)"]
    return {"compile_cold_s": times["cold"], "compile_warm_fx_cache_s": times["warm"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["int8", "bf16"], default="int8")
    parser.add_argument("--checkpoint-path", type=Path, default=None, help="a converted model (else random)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-seq-len", type=int, default=8448)
    parser.add_argument("--ttft-lengths", type=int, nargs="*", default=[128, 512, 2048, 8192])
    parser.add_argument("--moe-impl", choices=["fused", "gather"], default="fused",
                        help="fused: the Triton experts kernels; gather: upstream gpt-fast's gathered-expert "
                             "einsum (the baseline)")
    parser.add_argument("--fused-max-tokens", type=int, default=None,
                        help="largest token count that uses the fused expert kernels (prefill experiments)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the kernels of 20 decode steps")
    parser.add_argument("--compile-cache", action="store_true",
                        help="also time the first call cold and with a warm FX graph cache (two processes)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--json-only", action="store_true")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: the benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.coordinate_descent_tuning = True
    result = run(options)
    if options.compile_cache:
        result.update(measure_compile_cache(options))
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=2) + "\n")
    if options.json_only:
        print(json.dumps(result))
        return 0
    print(json.dumps(result, indent=2))
    print(f"\n{result['device']} {options.precision} batch {options.batch_size}: "
          f"{result['decode_tok_s']} tok/s = {100 * result['share_of_ceiling']:.0f}% of the "
          f"{result['ceiling_tok_s']} tok/s ceiling ({result['copy_bandwidth_tb_s']} TB/s); "
          f"TTFT ms {result['ttft_ms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
