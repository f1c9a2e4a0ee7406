"""Decode and prefill benchmark against the memory-bandwidth ceiling (see ../shared/PERF.md).

Builds the model with random weights of the real shape directly on the GPU (default Mixtral-8x7B), or
loads a converted checkpoint; measures copy bandwidth in the same process; reports decode tok/s
(median of warm runs), time to first token per prompt length, peak memory and compile times; prints the
ceiling and the share of it; records each GPU's power draw, SM clock and power-cap share during the
timed decode runs (`decode_gpu_telemetry`, per rank in `decode_gpu_telemetry_ranks`: a sustained decode
can hit the board's power limit, which lowers the clock); writes JSON (device, torch version, command)
for benchmarks/results/.

    python scripts/benchmark.py --precision int8 --out benchmarks/results/h200_int8.json

Tensor or expert parallel (gpt_fast_mixtral/tp.py) over N GPUs, one rank per GPU: every rank builds its
shard of the random model on its own GPU and runs the same requests in lockstep; rank 0 reports.

    torchrun --standalone --nproc-per-node 2 scripts/benchmark.py --parallel tp --precision int8 \\
        --baseline-json single.json --out tp2.json

`--device cpu --config tiny` is a smoke mode (a tiny Mixtral-shaped model on the CPU, gloo under torchrun)
that runs the same code paths for the tests; only --device cuda reports real numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from gpt_fast_mixtral import quantize  # noqa: E402
from gpt_fast_mixtral.checkpoint import meta_model  # noqa: E402
from gpt_fast_mixtral.config import ModelArgs  # noqa: E402
from gpt_fast_mixtral.generate import Engine, SamplingParams, exit_rank  # noqa: E402
from gpt_fast_mixtral.gpu_telemetry import GpuTelemetry, gpu_id  # noqa: E402
from gpt_fast_mixtral.kernels import allreduce as allreduce_kernels  # noqa: E402
from gpt_fast_mixtral.kernels import linear as linear_kernels  # noqa: E402
from gpt_fast_mixtral.kernels import moe as moe_kernels  # noqa: E402
from gpt_fast_mixtral.kernels import pdl  # noqa: E402
from gpt_fast_mixtral.model import Attention, FusedOnGpu, Linear, TransformerBlock  # noqa: E402
from gpt_fast_mixtral.quantize import quantize_int8  # noqa: E402
from gpt_fast_mixtral.tp import (  # noqa: E402
    ALL_REDUCES,
    PARALLEL_MODES,
    TensorParallelBlock,
    apply_tensor_parallel,
    init_process_group,
    leave_process_group,
)

MIXTRAL_8X7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         intermediate_size=14336, num_experts=8, num_experts_per_tok=2)
# Mixtral's layout in miniature, for the CPU smoke mode: heads, kv heads, experts and the intermediate
# size all divide by 1, 2 and 4, so tp and ep both run on up to 4 ranks.
TINY = ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, intermediate_size=128,
                 num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)
CONFIGS = {"mixtral-8x7b": MIXTRAL_8X7B, "tiny": TINY}

CEILING_NOTE = ("ceiling = copy bandwidth / bytes one rank reads per token (the ranks read at once; its "
                "1/world_size of the attention and routed expert weights, plus the output head, which every "
                "rank holds); it ignores the all-reduce latency (two per layer) and, as the single-GPU count "
                "does, the router gates and the embedding row; under ep it assumes the routed experts spread "
                "evenly over the ranks")


class NullTokenizer:
    """Stands in for sentencepiece: the benchmark feeds token ids and never stops on EOS."""

    bos_id, eos_id = 1, -1

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError("the benchmark passes token ids")

    def piece_bytes(self, token_id: int) -> bytes:
        return b"x"


def is_replicated(name: str) -> bool:
    """Whether tp.py leaves this state-dict entry whole on every rank (embedding, norms, router, head)."""
    return name.startswith(("tok_embeddings.", "norm.", "output.")) or name.endswith(
        ("_norm.weight", "block_sparse_moe.gate.weight"))


def tensor_seed(name: str) -> int:
    """A seed from the tensor's name that is the same in every process (Python's hash() is salted)."""
    return zlib.crc32(name.encode())


def random_model(args: ModelArgs, precision: str, device: str | torch.device,
                 shard: partial | None = None) -> torch.nn.Module:
    """Random weights of the real shape, made on the device (no 90 GB checkpoint needed).

    `shard` (apply_tensor_parallel with rank, world size and mode bound) runs on the meta model, so each
    rank allocates and fills only its part. Every tensor draws from a generator seeded by its name: the
    replicated ones (embedding, norms, router gates, head) come out identical on every rank, and so every
    rank routes every token the same way.
    """
    model = meta_model(args).to(torch.bfloat16)  # still on meta: float32 would not fit the GPU
    if precision == "int8":
        model = quantize_int8(model)
    if shard is not None:
        model = shard(model)  # on meta: only the shapes change
    check_fits(model, device, precision)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            generator = torch.Generator(device=tensor.device).manual_seed(tensor_seed(name))
            if tensor.dtype == torch.int8:
                tensor.copy_(torch.randint(-127, 128, tensor.shape, generator=generator, device=tensor.device,
                                           dtype=torch.int8))
            elif name.endswith("scales"):
                tensor.fill_(0.02 / 64)
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0, 0.02, generator=generator)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def check_fits(model: torch.nn.Module, device: str | torch.device, precision: str) -> None:
    """Exit with what to do when the weights alone exceed the GPU's free memory (bf16 Mixtral-8x7B, 93 GB,
    on an 80 GB H100)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        raise SystemExit(
            f"error: the {precision} weights need {need / 1e9:.1f} GB per GPU but {device} has {free / 1e9:.1f} GB "
            f"free: use --precision int8, or split the model over more GPUs (torchrun --nproc-per-node N "
            f"scripts/benchmark.py --parallel tp)")


def check_replicated(model: torch.nn.Module) -> None:
    """Raise if a replicated weight differs between ranks (the ranks would then route tokens differently)."""
    entries = [(name, tensor) for name, tensor in model.state_dict().items() if is_replicated(name)]
    sums = torch.stack([tensor.sum(dtype=torch.float64) for _, tensor in entries])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, dist.ReduceOp.MIN)
    dist.all_reduce(high, dist.ReduceOp.MAX)
    differ = [name for (name, _), a, b in zip(entries, low.tolist(), high.tolist(), strict=True) if a != b]
    if differ:
        raise RuntimeError(f"replicated weights differ between ranks: {', '.join(differ[:5])}")


def copy_bandwidth(device: str | torch.device, gigabytes: float = 4.0) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    numel = int(gigabytes * 1e9 / 2)
    with torch.cuda.device(device):
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
        torch.cuda.empty_cache()
    return 2 * numel * 2 / statistics.median(times[2:])


def bytes_per_token(args: ModelArgs, precision: str, batch: int = 1, world_size: int = 1) -> float:
    """Weight bytes one decode step must read (PERF.md's count: attention + routed experts + head); with
    `world_size` ranks, what one rank reads: its share of attention and experts, and the whole head,
    which every rank holds."""
    weight_bytes = 1 if precision == "int8" else 2
    attention = args.dim * args.qkv_out_features + args.n_heads * args.head_dim * args.dim
    expert = 3 * args.dim * args.intermediate_size
    touched = args.num_experts * (1 - (1 - args.num_experts_per_tok / args.num_experts) ** batch)
    per_layer = attention + touched * expert
    sharded = args.n_layers * per_layer * weight_bytes
    head = args.vocab_size * args.dim * weight_bytes
    return sharded / world_size + head


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(engine: Engine, prompt: list[list[int]], new_tokens: int) -> tuple[float, float]:
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(prompt)
    synchronize(engine.device)
    if dist.is_initialized():
        dist.barrier()  # every rank starts the clock together: no rank's time includes waiting for another
        synchronize(engine.device)
    start = time.perf_counter()
    result = engine.generate(prompt, params)[0]
    synchronize(engine.device)
    total = time.perf_counter() - start
    return total, result.time_to_first_token_s


def profile_kernels(engine: Engine, prompt: list[list[int]], new_tokens: int, label: str, show: bool = True,
                    per: int = 1) -> None:
    """Print the kernels of generating `new_tokens` after `prompt`, most expensive first (CUPTI sees into
    CUDA graphs), then the kernel count and GPU time per `per` (e.g. per decode step)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        time_generate(engine, prompt, new_tokens)
    if show:
        sort_by = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))
        if cuda:  # kernel launches and GPU time: what a fusion removes shows here
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_us = sum(e.device_time for e in kernels)
            print(f"per {label}: {len(kernels) / per:.0f} kernels, {gpu_us / per / 1000:.3f} ms of GPU time")
            intervals = [(e.name, e.time_range.start, e.time_range.end) for e in kernels]
            print(format_critical_path(critical_path(intervals), per, label))


def critical_path(intervals: list[tuple[str, float, float]], host_gap_us: float = 20.0
                  ) -> dict[str, tuple[list[float], list[float]]]:
    """Per kernel name: each call's time on the critical path and the idle GPU time before it, over kernels
    given as (name, start, end) in us on one stream. A kernel's share runs from the previous kernel's end
    to its own: under PDL a kernel starts while its predecessor runs and waits, so its own duration (the
    profiler's table) counts that wait twice, and the durations add up to more than the step. A gap longer
    than `host_gap_us` (the GPU waiting for the host to launch, e.g. between steps or in eager prefill) is
    counted under HOST_GAP, not against the kernel after it."""
    shares: dict[str, tuple[list[float], list[float]]] = {}
    previous_end = None
    for name, start, end in sorted(intervals, key=lambda interval: interval[2]):
        if previous_end is None or start - previous_end > host_gap_us:
            if previous_end is not None:
                shares.setdefault(HOST_GAP, ([], []))[0].append(start - previous_end)
            previous_end = start
        calls = shares.setdefault(name, ([], []))
        calls[0].append(max(0.0, end - previous_end))
        calls[1].append(max(0.0, start - previous_end))
        previous_end = max(previous_end, end)
    return shares


HOST_GAP = "(GPU idle waiting for the host)"


def format_critical_path(shares: dict[str, tuple[list[float], list[float]]], per: int, label: str,
                         rows: int = 16) -> str:
    total = sum(sum(times) for times, _ in shares.values())
    lines = [f"critical path per {label}: {total / per / 1000:.3f} ms (a kernel's share runs from the previous "
             "kernel's end to its own)", f"  {'kernel':60} {'calls':>6} {'us/call':>8} {'median':>7} "
             f"{'idle before (median us)':>24} {'share':>6}"]
    for name, (times, idles) in sorted(shares.items(), key=lambda item: -sum(item[1][0]))[:rows]:
        idle = f"{statistics.median(idles):.2f}" if idles else "-"
        lines.append(f"  {name[:60]:60} {len(times) / per:6.1f} {sum(times) / len(times):8.2f} "
                     f"{statistics.median(times):7.2f} {idle:>24} {sum(times) / total:6.1%}")
    return "\n".join(lines)


def synthetic_prompt(length: int, vocab_size: int, row: int = 0) -> list[int]:
    """BOS, then consecutive ids wrapping inside the vocabulary from an offset of 1009 per batch row: the
    rows of a batch differ, so they route to different experts as real requests do (identical rows
    would all read the same two experts per layer and overstate batched decode)."""
    token_range = min(30000, vocab_size - 100)
    return [1] + [100 + (row * 1009 + i) % token_range for i in range(length - 1)]


def experts_module(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if hasattr(m, "fused_max_tokens"))


def run(options: argparse.Namespace, device: torch.device, rank: int = 0, world_size: int = 1) -> dict:
    cuda = device.type == "cuda"
    compile_step = cuda and not options.no_compile
    torch.manual_seed(0)
    bandwidth = None
    if cuda:
        bandwidth = copy_bandwidth(device)  # every rank measures its own GPU; rank 0's is reported
        torch.cuda.reset_peak_memory_stats(device)  # peak memory is the model's, not the copy test's
    shard = None
    if options.parallel:
        shard = partial(apply_tensor_parallel, rank=rank, world_size=world_size, mode=options.parallel)
    if not options.int8_w13_blocks:
        quantize.INT8_W13_BLOCK = None  # the Engine then keeps the int8 experts' w1 / w3 row-major
    build_start = time.perf_counter()
    if options.checkpoint_path:
        # Each rank copies only its shards to its GPU (the replicated weights move with the model after).
        engine = Engine.from_checkpoint(options.checkpoint_path, device=device, dtype=torch.bfloat16,
                                        transform=shard and partial(shard, device=device),
                                        max_batch_size=options.batch_size,
                                        max_seq_len=options.max_seq_len, compile=compile_step)
        args = engine.model.args
    else:
        args = CONFIGS[options.config]
        model = random_model(args, options.precision, device, shard)
        if dist.is_initialized():
            check_replicated(model)
        engine = Engine(model, NullTokenizer(args.vocab_size), max_batch_size=options.batch_size,  # type: ignore[arg-type]
                        max_seq_len=options.max_seq_len, compile=compile_step)
    build_s = time.perf_counter() - build_start
    FusedOnGpu.enabled = not options.eager_prefill_ops
    if options.fused_router is not None:
        TransformerBlock.fused_router = options.fused_router
    if options.fused_rope_cache is not None:
        Attention.fused_rope_cache = options.fused_rope_cache
    if options.pdl is not None:
        pdl.ENABLED = options.pdl
    if options.decode_linear is not None:
        Linear.decode_kernel = options.decode_linear
    if options.wo_preload is not None:
        quantize.WeightOnlyInt8Linear.preload_config = linear_kernels.PRELOAD_CONFIG if options.wo_preload else None
    if options.fused_all_reduce is not None:
        TensorParallelBlock.fused_all_reduce = options.fused_all_reduce
    if options.push_pdl is not None:
        allreduce_kernels.PDL = options.push_pdl
    if options.fold_expert_sum is not None:
        TensorParallelBlock.fold_expert_sum = options.fold_expert_sum
    moe_kernels.DEFAULT_CONFIG = dataclasses.replace(moe_kernels.DEFAULT_CONFIG, **options.moe_settings)
    int8_linear = quantize.WeightOnlyInt8Linear
    int8_linear.kernel_config = dataclasses.replace(int8_linear.kernel_config, **options.linear_settings)
    if int8_linear.preload_config is not None:  # the attention's wo: the same settings
        int8_linear.preload_config = dataclasses.replace(int8_linear.preload_config, **options.linear_settings)
    for module in engine.model.modules():
        if hasattr(module, "dense_max_tokens") and options.moe_impl == "gather":
            module.dense_max_tokens = module.fused_max_tokens = 0
        elif hasattr(module, "fused_max_tokens") and options.fused_max_tokens is not None:
            module.fused_max_tokens = options.fused_max_tokens
    prompt = [synthetic_prompt(options.prompt_len, args.vocab_size, row) for row in range(options.batch_size)]

    compile_start = time.perf_counter()
    time_generate(engine, prompt, 4)  # compiles (or loads from the FX graph cache) the decode step
    first_call_s = time.perf_counter() - compile_start
    decode_rates = []
    # Power and SM clock of each rank's GPU during the timed runs: a sustained decode can reach the board's
    # power limit, which lowers the clock (gpt_fast_mixtral.gpu_telemetry); one window per run.
    telemetry = GpuTelemetry.start(gpu_id(device)) if cuda else None
    try:
        for _ in range(options.runs):
            with telemetry.window() if telemetry else contextlib.nullcontext():
                total, ttft = time_generate(engine, prompt, options.new_tokens)
            decode_rates.append((options.new_tokens - 1) / (total - ttft))
    finally:  # no nvidia-smi left sampling if a run fails
        if telemetry:
            telemetry.stop()
    decode_tok_s = statistics.median(decode_rates)
    power = telemetry.summary() if telemetry else None
    rank_power = [power]
    if dist.is_initialized() and world_size > 1:
        rank_power = [None] * world_size
        dist.all_gather_object(rank_power, power)

    if options.profile:
        # every rank runs it: the steps are collective
        profile_kernels(engine, prompt, 20, "decode step", show=rank == 0, per=20)

    ttft_ms = {}
    for length in options.ttft_lengths:
        if length + 2 > engine.max_seq_len:
            continue
        long_prompt = [synthetic_prompt(length, args.vocab_size)]
        time_generate(engine, long_prompt, 1)
        samples = [time_generate(engine, long_prompt, 1)[1] for _ in range(3)]
        ttft_ms[str(length)] = round(1e3 * statistics.median(samples), 2)
    if options.profile and ttft_ms:  # the longest prompt's prefill (and its one decode step)
        length = max(int(n) for n in ttft_ms)
        long_prompt = [synthetic_prompt(length, args.vocab_size)]
        profile_kernels(engine, long_prompt, 1, f"{length}-token prefill", show=rank == 0)

    rank_bytes = bytes_per_token(args, options.precision, options.batch_size, world_size)
    ceiling = None if bandwidth is None else bandwidth / rank_bytes  # the ranks read their shares at once
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if options.parallel:
        command = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', world_size)} {command}"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "command": command,
        "precision": options.precision,
        "moe_impl": options.moe_impl,
        "fused_max_tokens": experts_module(engine.model).fused_max_tokens,
        "grouped_min_slots": moe_kernels.DEFAULT_CONFIG.grouped_min_slots,
        "grouped_int8_fp16": moe_kernels.DEFAULT_CONFIG.grouped_int8_fp16,
        "moe_config": options.moe_settings,
        "linear_config": options.linear_settings,
        "int8_w13_block": experts_module(engine.model).w13_block,
        "fused_router": TransformerBlock.fused_router,
        "compiled_prefill_ops": FusedOnGpu.enabled,
        "fused_rope_cache": Attention.fused_rope_cache,
        "pdl": pdl.ENABLED,
        "push_pdl": allreduce_kernels.PDL,
        "decode_linear": Linear.decode_kernel,
        "wo_preload": quantize.WeightOnlyInt8Linear.preload_config is not None,
        "compile": compile_step,
        "parallel": options.parallel or "none",
        "world_size": world_size,
        "all_reduce": (options.all_reduce if cuda else "gloo") if options.parallel else None,
        "fused_all_reduce": TensorParallelBlock.fused_all_reduce if options.parallel else None,
        "fold_expert_sum": TensorParallelBlock.fold_expert_sum if options.parallel else None,
        "batch_size": options.batch_size,
        "prompt_len": options.prompt_len,
        "new_tokens": options.new_tokens,
        "copy_bandwidth_tb_s": None if bandwidth is None else round(bandwidth / 1e12, 3),
        "bytes_per_token_gb": round(bytes_per_token(args, options.precision, options.batch_size) / 1e9, 3),
        "ceiling_tok_s": None if ceiling is None else round(ceiling * options.batch_size, 1),
        "decode_tok_s": round(decode_tok_s * options.batch_size, 1),
        "decode_tok_s_runs": [round(r * options.batch_size, 1) for r in decode_rates],
        "decode_gpu_telemetry": power,  # rank 0's GPU; every rank's below under --parallel
        "share_of_ceiling": None if ceiling is None else round(decode_tok_s / ceiling, 3),
        "ttft_ms": ttft_ms,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if cuda else None,
        "build_s": round(build_s, 1),
        "first_call_s (compile or cache load)": round(first_call_s, 1),
    }
    if options.parallel:
        result["decode_gpu_telemetry_ranks"] = rank_power
        result["bytes_per_token_per_rank_gb"] = round(rank_bytes / 1e9, 3)
        result["ceiling_note"] = CEILING_NOTE
    return result


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


def read_baseline(path: Path) -> dict:
    """The single-GPU result that --baseline-json names; exits with a message if it cannot be used."""
    try:
        baseline = json.loads(path.read_text())
        float(baseline["decode_tok_s"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = f"error: --baseline-json {path}: not a benchmark result with decode_tok_s ({error!r})"
        raise SystemExit(message) from None
    return baseline


def add_baseline(result: dict, baseline: dict, path: Path) -> list[str]:
    """Add speedup_vs_single and baseline to `result`; return warnings where the runs do not compare."""
    result["speedup_vs_single"] = round(result["decode_tok_s"] / baseline["decode_tok_s"], 3)
    result["baseline"] = {"path": str(path), "decode_tok_s": baseline["decode_tok_s"],
                          "parallel": baseline.get("parallel", "none"), "world_size": baseline.get("world_size", 1)}
    return [f"warning: the baseline's {key} is {baseline.get(key)!r}, this run's {result[key]!r}"
            for key in ("device", "precision", "batch_size", "moe_impl", "compile") if baseline.get(key) != result[key]]


def summary_line(result: dict, options: argparse.Namespace) -> str:
    where = result["device"] if result["world_size"] == 1 else f"{result['world_size']}x {result['device']}"
    mode = "" if result["parallel"] == "none" else f" {result['parallel']}"
    line = f"{where}{mode} {options.precision} batch {options.batch_size}: {result['decode_tok_s']} tok/s"
    if result["share_of_ceiling"] is None:
        line += " (no ceiling: copy bandwidth is only measured on a GPU)"
    else:
        line += (f" = {100 * result['share_of_ceiling']:.0f}% of the {result['ceiling_tok_s']} tok/s ceiling "
                 f"({result['copy_bandwidth_tb_s']} TB/s)")
    if "speedup_vs_single" in result:
        line += (f"; {result['speedup_vs_single']}x the single run's {result['baseline']['decode_tok_s']} tok/s "
                 f"({result['baseline']['path']})")
    telemetry = result.get("decode_gpu_telemetry")
    if telemetry and telemetry.get("samples"):
        line += (f"; during decode {telemetry['power_w']} W of {telemetry['power_limit_w']}, SM clock "
                 f"{telemetry['sm_clock_mhz']} MHz (max {telemetry['sm_clock_max_mhz']}), power-capped in "
                 f"{100 * telemetry['power_capped_share']:.0f}% of samples")
    return f"{line}; TTFT ms {result['ttft_ms']}"


BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def config_settings(parser: argparse.ArgumentParser, flag: str, settings: list[str], config: type) -> dict:
    """NAME=VALUE strings as fields of the dataclass `config`, each converted to its default's type."""
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    converted = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in defaults or not value:
            parser.error(f"{flag} {setting}: expected NAME=VALUE, NAME one of {', '.join(defaults)}")
        kind = type(defaults[name])
        if kind is bool:
            if value.lower() not in BOOLEANS:
                parser.error(f"{flag} {setting}: {name} takes one of {', '.join(BOOLEANS)}")
            converted[name] = BOOLEANS[value.lower()]
            continue
        try:
            converted[name] = kind(value)
        except ValueError:
            parser.error(f"{flag} {setting}: {name} takes a {kind.__name__}")
    return converted


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["int8", "bf16"], default="int8")
    parser.add_argument("--checkpoint-path", type=Path, default=None, help="a converted model (else random)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mixtral-8x7b",
                        help="shape of the random model (tiny: the CPU smoke mode's)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: smoke mode for tests (no compile, no copy bandwidth, no ceiling)")
    parser.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                        help="under torchrun: tp slices every expert, ep gives each rank whole experts "
                             "(attention is split by heads in both); one rank per GPU")
    parser.add_argument("--all-reduce", choices=ALL_REDUCES, default="push",
                        help="decode-sized all-reduces through symmetric memory (tp.enable_one_shot_all_reduce) "
                             "by our push kernel (kernels/allreduce.py, the default) or by PyTorch's one-shot "
                             "kernel; nccl: all through NCCL")
    parser.add_argument("--fused-all-reduce", action=argparse.BooleanOptionalAction, default=None,
                        help="push all-reduces fused with the residual add, the norm and the routing (default: "
                             "tp.TensorParallelBlock.fused_all_reduce, on; applies with --all-reduce push)")
    parser.add_argument("--fold-expert-sum", action=argparse.BooleanOptionalAction, default=None,
                        help="the fused push after the experts sums their float32 partials itself instead of a "
                             "kernel before it (default: tp.TensorParallelBlock.fold_expert_sum, on)")
    parser.add_argument("--push-pdl", action=argparse.BooleanOptionalAction, default=None,
                        help="the push all-reduce kernels launched with programmatic dependent launch where "
                             "--pdl is on, so the next kernel's programs come in (and load their weights) "
                             "while the exchange waits on the peers (default: kernels.allreduce.PDL, on)")
    parser.add_argument("--baseline-json", type=Path, default=None,
                        help="a single-GPU result of the same session: adds speedup_vs_single")
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
    parser.add_argument("--fused-router", action=argparse.BooleanOptionalAction, default=None,
                        help="residual add, ffn norm and routing in one kernel (default: "
                             "model.TransformerBlock.fused_router, on)")
    parser.add_argument("--eager-prefill-ops", action="store_true",
                        help="prefill's rms_norm and rotary embedding as eager PyTorch ops instead of one "
                             "compiled kernel each (model.FusedOnGpu)")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                        help="one-token decode kernels launched with programmatic dependent launch on sm_90+, "
                             "the MoE block ending in a kernel of ours (default: "
                             "gpt_fast_mixtral.kernels.pdl.ENABLED, on)")
    parser.add_argument("--decode-linear", action=argparse.BooleanOptionalAction, default=None,
                        help="one-token products of 16-bit linear weights (bf16's wqkv, wo, output) in "
                             "kernels/linear.py's kernel, launched with PDL, instead of cuBLAS (default: "
                             "model.Linear.decode_kernel, on)")
    parser.add_argument("--wo-preload", action=argparse.BooleanOptionalAction, default=None,
                        help="int8's one-token attention output projection in the kernel that loads its whole "
                             "weight before its PDL wait, the decode attention letting it in after its own wait "
                             "(kernels.linear.PRELOAD_CONFIG; default: on)")
    parser.add_argument("--fused-rope-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="rotary embedding, KV-cache write and attention of a decode step in one kernel "
                             "(default: model.Attention.fused_rope_cache, on)")
    parser.add_argument("--grouped-min-slots", type=int, default=None,
                        help="(token, k) slots from which the fused experts use the grouped GEMM kernels "
                             "(prefill experiments; with --fused-max-tokens above the prompt length)")
    parser.add_argument("--int8-fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="int8 prefill experts on float16 tensor cores, activations scaled per row "
                             "(default: kernels.moe's grouped_int8_fp16, on)")
    parser.add_argument("--moe-config", nargs="*", default=[], metavar="NAME=VALUE",
                        help="kernels.moe.MoEConfig settings for comparisons, e.g. gemv_stages=1")
    parser.add_argument("--linear-config", nargs="*", default=[], metavar="NAME=VALUE",
                        help="the int8 linears' kernels.linear.LinearConfig settings (wo's PRELOAD_CONFIG "
                             "takes them too), e.g. gemv_stages=1")
    parser.add_argument("--int8-w13-blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="the int8 experts' gate and up weights stored in blocks on the GPU "
                             "(gpt_fast_mixtral.quantize.INT8_W13_BLOCK; default on)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the kernels of 20 decode steps")
    parser.add_argument("--compile-cache", action="store_true",
                        help="also time the first call cold and with a warm FX graph cache (two processes)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    parser.add_argument("--json-only", action="store_true")
    options = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if options.parallel is None and world_size > 1:
        parser.error(f"started on {world_size} ranks (torchrun): pass --parallel tp or --parallel ep")
    if options.parallel and "RANK" not in os.environ:
        parser.error("--parallel runs one process per GPU: start it with torchrun --nproc-per-node N")
    if options.device == "cpu" and options.config != "tiny" and options.checkpoint_path is None:
        parser.error("--device cpu is a smoke mode for the tests: use it with --config tiny")
    if options.compile_cache and (options.parallel or options.device == "cpu"):
        parser.error("--compile-cache runs single-GPU processes: leave out --parallel and --device cpu")
    # --grouped-min-slots and --int8-fp16 are MoEConfig settings too (the latter wins over --moe-config)
    options.moe_settings = {
        **({} if options.grouped_min_slots is None else {"grouped_min_slots": options.grouped_min_slots}),
        **config_settings(parser, "--moe-config", options.moe_config, moe_kernels.MoEConfig),
        **({} if options.int8_fp16 is None else {"grouped_int8_fp16": options.int8_fp16})}
    options.linear_settings = config_settings(parser, "--linear-config", options.linear_config,
                                              linear_kernels.LinearConfig)
    return options


def benchmark(options: argparse.Namespace) -> int:
    """Run the benchmark in this process (one rank of several under --parallel); rank 0 reports."""
    baseline = read_baseline(options.baseline_json) if options.baseline_json else None
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if options.device == "cuda":
        if not torch.cuda.is_available():
            print("error: the benchmark needs a CUDA GPU (--device cpu --config tiny is the smoke mode)",
                  file=sys.stderr)
            return 1
        index = int(os.environ.get("LOCAL_RANK", "0")) if options.parallel else torch.cuda.current_device()
        device = torch.device("cuda", index)
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        inductor_config.coordinate_descent_tuning = True
    else:
        device = torch.device("cpu")
    if options.parallel:
        init_process_group(device, options.all_reduce)  # NCCL on this rank's GPU, gloo on the CPU
    result = run(options, device, rank, world_size)
    if options.compile_cache:
        result.update(measure_compile_cache(options))
    leave_process_group()  # together (see generate.main)
    if rank != 0:
        return 0
    warnings = add_baseline(result, baseline, options.baseline_json) if baseline else []
    for warning in warnings:
        print(warning, file=sys.stderr)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=2) + "\n")
    if options.json_only:
        print(json.dumps(result))
        return 0
    print(json.dumps(result, indent=2))
    print(f"\n{summary_line(result, options)}")
    return 0


def main() -> int:
    options = parse_args()
    if not options.parallel:
        return benchmark(options)
    # One rank of a torchrun job. A rank that fails says so and exits; torchrun then stops the others
    # (they would wait in a collective). Ranks end through exit_rank (see gpt_fast_mixtral.generate).
    try:
        status = benchmark(options)
    except SystemExit as error:
        print(error, file=sys.stderr)
        status = 2
    except BaseException:
        print(f"error on rank {os.environ.get('RANK')}:", file=sys.stderr)
        traceback.print_exc()
        status = 1
    exit_rank(status)
    return status  # not reached


if __name__ == "__main__":
    sys.exit(main())
