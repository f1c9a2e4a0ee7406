"""scripts/benchmark.py in its CPU smoke mode (`--device cpu --config tiny`): one process, and tensor and
expert parallel on two ranks under torchrun (gloo), with --baseline-json; and the pieces the GPU numbers
rest on (the per-rank bytes of the ceiling, replicated weights identical on every rank).

The GPU runs themselves happen on the GPU machine (benchmarks/run_parallel.sh); this checks that the code
paths they take work before that machine's time is spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from gpt_fast_mixtral.tp import apply_tensor_parallel

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
SMOKE_ARGS = ["--device", "cpu", "--config", "tiny", "--new-tokens", "6", "--runs", "1", "--ttft-lengths", "24",
              "--max-seq-len", "48", "--json-only"]


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


benchmark = load_benchmark_module()


def run_benchmark(args: list[str], world_size: int | None = None) -> dict:
    """Run the script (under torchrun with `world_size` ranks when given); return the JSON it printed, which
    must be the only line on stdout (rank 0 alone reports)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if world_size is not None:
        # --standalone: torchrun binds a free port itself, with no window for another process to take it.
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size)]
    result = subprocess.run([*launcher, str(SCRIPT), *SMOKE_ARGS, *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


# ---------------------------------------------------------------------------------------------------
# In this process: the ceiling's bytes, and the random model's shards.


def test_bytes_per_token_counts_a_ranks_share_plus_the_replicated_head() -> None:
    args = benchmark.MIXTRAL_8X7B
    # One GPU: PERF.md's figures, as before the parallel mode existed.
    assert round(benchmark.bytes_per_token(args, "int8") / 1e9, 3) == 12.748
    assert round(benchmark.bytes_per_token(args, "bf16") / 1e9, 3) == 25.495
    head = args.vocab_size * args.dim
    for precision, weight_bytes in (("int8", 1), ("bf16", 2)):
        whole = benchmark.bytes_per_token(args, precision)
        for world_size in (2, 4, 8):
            expected = (whole - head * weight_bytes) / world_size + head * weight_bytes
            assert benchmark.bytes_per_token(args, precision, 1, world_size) == pytest.approx(expected)


@pytest.mark.parametrize("vocab_size", [32000, 512])
def test_the_rows_of_a_batch_get_different_prompts_inside_the_vocabulary(vocab_size: int) -> None:
    # Identical rows route to the same experts and make batched decode look faster than the ceiling.
    rows = [benchmark.synthetic_prompt(64, vocab_size, row) for row in range(8)]
    assert len({tuple(row) for row in rows}) == 8
    for row in rows:
        assert len(row) == 64 and row[0] == 1 and all(100 <= token < vocab_size for token in row[1:])
    assert benchmark.synthetic_prompt(64, vocab_size) == rows[0]


def test_weights_larger_than_the_free_gpu_memory_exit_with_what_to_do(monkeypatch) -> None:
    from gpt_fast_mixtral.checkpoint import meta_model
    from gpt_fast_mixtral.quantize import quantize_int8

    model = meta_model(benchmark.MIXTRAL_8X7B).to(torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (79 * 10**9, 80 * 10**9))  # an H100
    with pytest.raises(SystemExit, match=r"bf16 weights need 93\.4 GB per GPU .* 79\.0 GB free: use --precision int8"):
        benchmark.check_fits(model, "cuda", "bf16")
    benchmark.check_fits(quantize_int8(model), "cuda", "int8")  # ~47 GB: fits
    half = apply_tensor_parallel(meta_model(benchmark.MIXTRAL_8X7B).to(torch.bfloat16), rank=0, world_size=2,
                                 mode="tp")
    benchmark.check_fits(half, "cuda", "bf16")  # two GPUs: ~47 GB each


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_every_rank_draws_the_same_replicated_weights(precision: str, mode: str) -> None:
    """Each rank fills its shard from generators seeded by tensor name: the embedding, norms, router gates and
    head come out identical on every rank (and as in the unsharded model), so all ranks route alike."""
    args = benchmark.TINY
    whole = benchmark.random_model(args, precision, "cpu").state_dict()
    ranks = [benchmark.random_model(args, precision, "cpu",
                                    partial(apply_tensor_parallel, rank=rank, world_size=2, mode=mode)).state_dict()
             for rank in range(2)]
    replicated = [name for name in ranks[0] if benchmark.is_replicated(name)]
    # embedding, final norm, head (+ its int8 scales), and per layer two norms and the router gate
    assert len(replicated) == 3 + (precision == "int8") + 3 * args.n_layers
    assert sum(name.endswith("block_sparse_moe.gate.weight") for name in replicated) == args.n_layers
    for name in replicated:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], whole[name]), name
    wqkv = "layers.0.attention.wqkv.weight"
    assert ranks[0][wqkv].shape[0] == whole[wqkv].shape[0] // 2  # the split ones are shards
    assert all(tensor.device.type == "cpu" for tensor in ranks[0].values())


def test_the_seed_of_a_tensor_is_stable_across_processes() -> None:
    """crc32 of the name, not Python's salted hash(): another interpreter gets the same seed."""
    name = "layers.3.block_sparse_moe.gate.weight"
    code = f"import zlib; print(zlib.crc32({name!r}.encode()))"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "random"},
                           capture_output=True, text=True, check=True).stdout
    assert int(other) == benchmark.tensor_seed(name)


# ---------------------------------------------------------------------------------------------------
# The script: one process, then two ranks under torchrun with the one-process result as baseline.


@pytest.fixture(scope="module")
def single_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    out_dir = tmp_path_factory.mktemp("benchmark_single")
    results = {}
    for precision in ("bf16", "int8"):
        path = out_dir / f"{precision}_single.json"
        printed = run_benchmark(["--precision", precision, "--out", str(path)])
        assert json.loads(path.read_text()) == printed
        results[precision] = (path, printed)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_single_process_smoke_run_reports_no_parallelism_and_no_ceiling(
        single_results: dict[str, tuple[Path, dict]], precision: str) -> None:
    _, result = single_results[precision]
    assert result["parallel"] == "none" and result["world_size"] == 1
    assert result["device"] == "cpu" and result["precision"] == precision and result["compile"] is False
    assert result["decode_tok_s"] > 0 and len(result["decode_tok_s_runs"]) == 1
    assert set(result["ttft_ms"]) == {"24"}
    # Only a GPU measures copy bandwidth: no ceiling, no share of it, no peak memory on the CPU.
    for key in ("copy_bandwidth_tb_s", "ceiling_tok_s", "share_of_ceiling", "peak_memory_gb", "decode_gpu_telemetry"):
        assert result[key] is None, key
    assert "speedup_vs_single" not in result and "baseline" not in result
    assert "decode_gpu_telemetry_ranks" not in result


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_two_ranks_under_torchrun_report_once_with_the_speedup_over_one(
        single_results: dict[str, tuple[Path, dict]], tmp_path: Path, mode: str, precision: str) -> None:
    baseline_path, baseline = single_results[precision]
    out = tmp_path / f"{precision}_{mode}2.json"
    result = run_benchmark(["--parallel", mode, "--precision", precision, "--baseline-json", str(baseline_path),
                            "--out", str(out)], world_size=2)
    assert json.loads(out.read_text()) == result
    assert result["parallel"] == mode and result["world_size"] == 2
    assert result["command"].startswith("torchrun --nproc-per-node 2 benchmark.py")
    assert result["decode_tok_s"] > 0 and set(result["ttft_ms"]) == {"24"}
    assert result["ceiling_tok_s"] is None and "all-reduce" in result["ceiling_note"]
    assert result["bytes_per_token_per_rank_gb"] <= result["bytes_per_token_gb"]
    assert result["decode_gpu_telemetry_ranks"] == [None, None]  # gathered from both ranks; no GPU here
    assert result["speedup_vs_single"] == round(result["decode_tok_s"] / baseline["decode_tok_s"], 3)
    assert result["baseline"]["path"] == str(baseline_path)
    assert result["baseline"]["decode_tok_s"] == baseline["decode_tok_s"]


def test_the_critical_path_gives_each_kernel_the_time_from_the_previous_end_to_its_own() -> None:
    # a PDL pair (b starts before a ends and waits), 2 us of idle GPU before c, b once more, then a host gap
    intervals = [("c", 10.0, 14.0), ("a", 0.0, 5.0), ("b", 1.0, 8.0), ("b", 14.0, 15.5), ("a", 50.0, 52.0)]
    shares = benchmark.critical_path(intervals, host_gap_us=20.0)
    assert shares == {"a": ([5.0, 2.0], [0.0, 0.0]), "b": ([3.0, 1.5], [0.0, 0.0]), "c": ([6.0], [2.0]),
                      benchmark.HOST_GAP: ([34.5], [])}
    assert sum(sum(times) for times, _ in shares.values()) == 52.0  # the shares add up to the span
    table = benchmark.format_critical_path(shares, per=1, label="step").splitlines()
    assert table[2].split()[-5:] == ["1.0", "34.50", "34.50", "-", "66.3%"]  # the largest share first
    assert table[3].split() == ["a", "2.0", "3.50", "3.50", "0.00", "13.5%"]
    assert table[4].split() == ["c", "1.0", "6.00", "6.00", "2.00", "11.5%"]  # 2 us idle, then its own 4


def test_kernel_config_settings_are_typed_and_checked() -> None:
    parser = argparse.ArgumentParser()
    settings = benchmark.config_settings(parser, "--moe-config", ["gemv_stages=2", "int8_magic=false"],
                                         benchmark.moe_kernels.MoEConfig)
    assert settings == {"gemv_stages": 2, "int8_magic": False}
    assert benchmark.config_settings(parser, "--moe-config", ["int8_magic=TRUE"],
                                     benchmark.moe_kernels.MoEConfig) == {"int8_magic": True}
    # a misspelt boolean is an error, not False
    for bad in (["no_such_field=1"], ["gemv_stages=two"], ["gemv_stages"], ["int8_magic=ture"]):
        with pytest.raises(SystemExit):
            benchmark.config_settings(parser, "--moe-config", bad, benchmark.moe_kernels.MoEConfig)
