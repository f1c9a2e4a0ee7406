"""Tensor parallelism ("tp": experts sliced along their intermediate dimension) and expert parallelism ("ep":
whole experts per rank), both with attention split by heads, on the CPU over gloo (and on two GPUs over
NCCL where a machine has them).

A sharded model computes the unsharded model's logits (float32 and int8 checkpoints, world sizes 2, 4 and 8;
bfloat16 within a stated tolerance) and tokens; every rank samples the same tokens; shapes that do not
divide are refused by name; the torchrun CLI prints one answer and the TorchServe handler answers once,
from rank 0, like one process does.

Multi-process runs start one `tests/tp_ranks.py` per rank (RANK, WORLD_SIZE, MASTER_PORT set as torchrun
sets them) and are bounded in time; each run is shared by the tests that read its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tp_ranks import (
    CHECKPOINTS,
    GREEDY_TOKENS,
    HANDLER_REQUESTS,
    MAX_BATCH,
    MAX_SEQ_LEN,
    MODES,
    PROMPTS,
    probe_logits,
)

from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model, meta_model
from gpt_fast_mixtral.config import ModelArgs
from gpt_fast_mixtral.generate import Engine, SamplingParams
from gpt_fast_mixtral.kernels.allreduce import reference_all_reduce
from gpt_fast_mixtral.model import ConditionalFeedForward
from gpt_fast_mixtral.quantize import ConditionalFeedForwardInt8, quantize_checkpoint, quantize_int8
from gpt_fast_mixtral.tiny_model import hf_state_dict, tiny_model_args
from gpt_fast_mixtral.tokenizer import Tokenizer
from gpt_fast_mixtral.tp import (
    ONE_SHOT_MAX_BYTES,
    ExpertParallelExperts,
    apply_tensor_parallel,
    check_parallel,
    enable_one_shot_all_reduce,
    init_process_group,
    valid_world_sizes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RANK_SCRIPT = Path(__file__).resolve().parent / "tp_ranks.py"
REL_TOL = 1e-5  # float32 logits: only the order of the sums differs between sharded and whole
MIXTRAL_8X7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         intermediate_size=14336, num_experts=8, num_experts_per_tok=2)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def launch_ranks(world_size: int, scenario: str, source: Path, out_dir: Path, timeout: float,
                 **env: str) -> list[dict]:
    """Run tests/tp_ranks.py on `world_size` ranks; return each rank's results. A rank that fails ends
    the run at once (the others would wait in a collective); so does the time limit."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # This process hosts the rendezvous store, as torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE makes
    # rank 0 a client too): its port is held from before any rank starts, so nothing can take it meanwhile.
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    common = {**os.environ, **env, "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
              "OMP_NUM_THREADS": "1"}
    processes = []
    for rank in range(world_size):
        with (out_dir / f"rank{rank}.log").open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, str(RANK_SCRIPT), scenario, str(out_dir), str(source)], cwd=REPO_ROOT,
                env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes):
            failed = any(p.poll() not in (None, 0) for p in processes)
            if failed or time.monotonic() > deadline:
                logs = "\n".join(f"----- rank {rank} -----\n{(out_dir / f'rank{rank}.log').read_text()[-3000:]}"
                                 for rank in range(world_size))
                pytest.fail(f"{scenario} on {world_size} ranks {'failed' if failed else f'ran past {timeout} s'}"
                            f"\n{logs}")
            time.sleep(0.1)
    finally:
        for process in processes:  # only ours, by handle
            if process.poll() is None:
                process.kill()
                process.wait()
        del store
    assert all(p.returncode == 0 for p in processes)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def reference_generations(engine: Engine) -> list[list[int]]:
    results = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=GREEDY_TOKENS)] * len(PROMPTS))
    return [result.tokens for result in results]


# ---------------------------------------------------------------------------------------------------
# Shapes that do not divide: refused before anything is sharded, naming the numbers and what would work.


@pytest.mark.parametrize(("args", "world_size", "mode", "message"), [
    (MIXTRAL_8X7B, 3, "tp", r"3 does not divide num_attention_heads \(32\), num_key_value_heads \(8\) and "
                            r"intermediate_size \(14336\); tp can split this model over 2, 4 or 8 ranks"),
    (MIXTRAL_8X7B, 16, "tp", r"16 does not divide num_key_value_heads \(8\); tp can split this model over "
                             r"2, 4 or 8 ranks"),
    (MIXTRAL_8X7B, 16, "ep", r"16 does not divide num_key_value_heads \(8\) and num_local_experts \(8\); "
                             r"ep can split this model over 2, 4 or 8 ranks"),
    (tiny_model_args(1024), 4, "tp", r"4 does not divide num_key_value_heads \(2\); tp can split this model "
                                     r"over 2 ranks"),
    (tiny_model_args(1024, n_heads=9, n_kv_heads=3, dim=144), 2, "ep",
     r"2 does not divide num_attention_heads \(9\) and num_key_value_heads \(3\); ep cannot split this model "
     r"over any number of ranks"),
], ids=["mixtral-tp3", "mixtral-tp16", "mixtral-ep16", "tiny-tp4", "odd-heads-ep2"])
def test_shapes_that_do_not_divide_are_refused_with_the_numbers_and_the_world_sizes_that_work(
        args: ModelArgs, world_size: int, mode: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_parallel(args, world_size, mode)
    model = meta_model(args)
    with pytest.raises(ValueError, match=message):
        apply_tensor_parallel(model, 0, world_size, mode)
    assert model.layers[0].attention.n_heads == args.n_heads  # nothing was sharded


def test_world_sizes_that_divide_are_accepted() -> None:
    assert valid_world_sizes(MIXTRAL_8X7B, "tp") == valid_world_sizes(MIXTRAL_8X7B, "ep") == [1, 2, 4, 8]
    for world_size in (1, 2, 4, 8):
        for mode in MODES:
            check_parallel(MIXTRAL_8X7B, world_size, mode)


@pytest.mark.parametrize(("call", "message"), [
    (lambda model: apply_tensor_parallel(model, 0, 2, "pp"), r"parallel mode must be one of tp, ep, got 'pp'"),
    (lambda model: apply_tensor_parallel(model, 2, 2), r"rank must be in \[0, 2\), got 2"),
    (lambda model: apply_tensor_parallel(model, 0, 0), r"world size must be a positive integer, got 0"),
    (lambda model: apply_tensor_parallel(apply_tensor_parallel(model, 0, 2), 0, 2), r"already sharded"),
], ids=["mode", "rank", "world_size", "twice"])
def test_bad_arguments_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(meta_model(MIXTRAL_8X7B))


# ---------------------------------------------------------------------------------------------------
# What each rank keeps (one process, no collectives run).


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("mode", MODES)
def test_each_rank_of_mixtral_8x7b_keeps_its_share_and_the_replicated_weights(mode: str, int8: bool) -> None:
    """On the meta device: Mixtral-8x7B over 8 ranks, the shapes each rank ends up with."""
    model = meta_model(MIXTRAL_8X7B)
    if int8:
        model = quantize_int8(model)
    replicated = {name: tensor.shape for name, tensor in model.state_dict().items()
                  if "attention." not in name and "cond_ffn" not in name}
    apply_tensor_parallel(model, 3, 8, mode)
    attention, moe = model.layers[31].attention, model.layers[31].block_sparse_moe
    assert (attention.n_heads, attention.n_kv_heads) == (4, 1)
    assert attention.wqkv.weight.shape == ((4 + 2 * 1) * 128, 4096)
    assert attention.wo.weight.shape == (4096, 4 * 128)
    if int8:
        assert attention.wqkv.scales.shape == (6 * 128,)
        assert attention.wo.scales.shape == (4096,)  # per output channel: not split
    if mode == "tp":
        experts = moe.cond_ffn
        assert experts.w1.shape == experts.w3.shape == (8, 14336 // 8, 4096)
        assert experts.w2.shape == (8, 4096, 14336 // 8)
        if int8:
            assert experts.w1_scales.shape == (8, 14336 // 8) and experts.w2_scales.shape == (8, 4096)
    else:
        assert isinstance(moe.cond_ffn, ExpertParallelExperts) and moe.cond_ffn.first_expert == 3
        experts = moe.cond_ffn.experts
        assert experts.w1.shape == experts.w3.shape == (1, 14336, 4096)
        assert experts.w2.shape == (1, 4096, 14336)
        if int8:
            assert experts.w1_scales.shape == (1, 14336) and experts.w2_scales.shape == (1, 4096)
    assert isinstance(experts, ConditionalFeedForwardInt8 if int8 else ConditionalFeedForward)
    now = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert {name: now[name] for name in replicated} == replicated  # router, norms, embedding, output head


@pytest.fixture(autouse=True)
def _inductor_config_restored():
    """Sharding over ranks sets Inductor's deterministic mode process-wide: back as it was after each test
    (through Inductor's own patch: pytest's monkeypatch would delete the setting on undo, see test_handler)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(deterministic=inductor_config.deterministic):
        yield


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharding_over_ranks_makes_inductor_choose_configs_without_timing(world_size: int) -> None:
    """Timed choices (a reduction's block size) can differ between ranks and change the sums' bits."""
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = False  # restored by _inductor_config_restored
    apply_tensor_parallel(meta_model(MIXTRAL_8X7B), 0, world_size)
    assert inductor_config.deterministic is (world_size > 1)


def test_a_rank_keeps_copies_of_its_query_and_key_value_heads_not_views(tiny_converted_dir: Path) -> None:
    whole = load_model(tiny_converted_dir / "model.pth", dtype=torch.float32)
    wqkv = whole.layers[0].attention.wqkv.weight.clone()
    sharded = apply_tensor_parallel(load_model(tiny_converted_dir / "model.pth", dtype=torch.float32), 1, 2)
    # The tiny model: 4 query heads then 2 key and 2 value heads of 16 rows each; rank 1 of 2 keeps query
    # heads 2 and 3, key head 1 and value head 1, in that order.
    q, k, v = wqkv.split([64, 32, 32])
    expected = torch.cat([q[32:], k[16:], v[16:]])
    weight = sharded.layers[0].attention.wqkv.weight
    assert torch.equal(weight, expected)
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()  # not a view
    experts = sharded.layers[0].block_sparse_moe.cond_ffn
    assert experts.w2.is_contiguous()
    assert experts.w2.untyped_storage().nbytes() == experts.w2.numel() * experts.w2.element_size()


@pytest.mark.parametrize("tokens", [1, 12, 100], ids=["gathered", "dense", "grouped"])
@pytest.mark.parametrize("mode", MODES)
def test_the_ranks_expert_outputs_add_up_to_the_whole_layer(tiny_converted_dir: Path, mode: str,
                                                             tokens: int) -> None:
    """What the all-reduce after the MoE block relies on: each rank's experts give its share of the sum.
    Under ep a token's slots may name a local expert twice (one of them zero-weighted); nothing is lost."""
    whole = load_model(tiny_converted_dir / "model_int8.pth", dtype=torch.float32)
    ranks = [apply_tensor_parallel(load_model(tiny_converted_dir / "model_int8.pth", dtype=torch.float32),
                                   rank, 2, mode) for rank in range(2)]
    x = torch.randn(tokens, whole.args.dim, generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        for layer in range(whole.args.n_layers):
            moe = whole.layers[layer].block_sparse_moe
            weights, indices = moe.route(x)
            expected = moe.cond_ffn(x, weights, indices)
            parts = [model.layers[layer].block_sparse_moe.cond_ffn(x, weights, indices) for model in ranks]
            assert relative_error(sum(parts), expected) < REL_TOL


# ---------------------------------------------------------------------------------------------------
# Two ranks over gloo: the tiny model, float32 and int8, both modes.


@pytest.fixture(scope="module")
def two_ranks(tiny_converted_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch_ranks(2, "engine", tiny_converted_dir, tmp_path_factory.mktemp("tp2"), timeout=180)


@pytest.fixture(scope="module")
def unsharded(tiny_converted_dir: Path) -> dict[str, dict]:
    """The unsharded model's probe logits and greedy tokens, per checkpoint."""
    tokenizer = Tokenizer(tiny_converted_dir / "tokenizer.model")
    references = {}
    for name in CHECKPOINTS:
        model = load_model(tiny_converted_dir / name, dtype=torch.float32)
        logits = probe_logits(model)
        engine = Engine(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)
        references[name] = {"logits": logits, "greedy": reference_generations(engine)}
    return references


CASES = [(name, mode) for name in CHECKPOINTS for mode in MODES]
CASE_IDS = [f"{name.removesuffix('.pth')}-{mode}" for name, mode in CASES]


@pytest.mark.slow
@pytest.mark.parametrize(("checkpoint", "mode"), CASES, ids=CASE_IDS)
def test_two_ranks_compute_the_unsharded_logits(two_ranks, unsharded, checkpoint: str, mode: str) -> None:
    expected = unsharded[checkpoint]["logits"]
    for path, logits in two_ranks[0][f"{checkpoint}/{mode}/logits"].items():
        assert relative_error(logits, expected[path]) < REL_TOL, path
        assert torch.equal(two_ranks[1][f"{checkpoint}/{mode}/logits"][path], logits), "ranks disagree"


@pytest.mark.slow
@pytest.mark.parametrize(("checkpoint", "mode"), CASES, ids=CASE_IDS)
def test_two_ranks_generate_the_unsharded_greedy_tokens(two_ranks, unsharded, checkpoint: str, mode: str) -> None:
    expected = unsharded[checkpoint]["greedy"]
    assert len({tuple(tokens) for tokens in expected}) == len(PROMPTS)  # the prompts differ in their answers
    for rank, results in enumerate(two_ranks):
        assert results[f"{checkpoint}/{mode}/generate"]["greedy"] == expected, f"rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize(("checkpoint", "mode"), CASES, ids=CASE_IDS)
def test_an_unseeded_sampled_request_gives_every_rank_the_same_tokens(two_ranks, checkpoint: str, mode: str
                                                                      ) -> None:
    rank0, rank1 = (results[f"{checkpoint}/{mode}/generate"]["sampled"] for results in two_ranks)
    assert len(rank0[0]) >= 1
    assert rank0 == rank1


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_decode_step_compiles_whole_with_its_all_reduces(two_ranks, mode: str) -> None:
    """torch.compile(fullgraph=True) traces the functional all-reduces (no graph break), as the CUDA-graph
    decode step needs; the compiled step gives the eager logits."""
    assert all(results[f"model.pth/{mode}/compiled"] for results in two_ranks)


# ---------------------------------------------------------------------------------------------------
# Four and eight ranks: a tiny model whose heads, kv heads, experts and intermediate size all divide by 8.


@pytest.fixture(scope="module")
def divisible_by_8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 heads, 8 kv heads, 8 experts, intermediate size 128: model.pth (float32) and model_int8.pth."""
    args = tiny_model_args(256, n_heads=8, n_kv_heads=8)
    source = tmp_path_factory.mktemp("divisible_by_8_hf")
    (source / "config.json").write_text(json.dumps(args.to_hf_config()))
    save_file(hf_state_dict(args, seed=3, dtype=torch.float32), str(source / "model.safetensors"))
    model_pth = convert_checkpoint(source, tmp_path_factory.mktemp("divisible_by_8") / "model.pth")
    quantize_checkpoint(model_pth, device="cpu")
    return model_pth.parent


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [4, 8])
def test_four_and_eight_ranks_compute_the_unsharded_logits(divisible_by_8: Path, tmp_path: Path,
                                                           world_size: int) -> None:
    ranks = launch_ranks(world_size, "logits", divisible_by_8, tmp_path, timeout=240)
    for name in CHECKPOINTS:
        expected = probe_logits(load_model(divisible_by_8 / name, dtype=torch.float32))
        for mode in MODES:
            for path, logits in ranks[0][f"{name}/{mode}/logits"].items():
                assert relative_error(logits, expected[path]) < REL_TOL, (name, mode, path)
                assert all(torch.equal(r[f"{name}/{mode}/logits"][path], logits) for r in ranks), "ranks disagree"


# ---------------------------------------------------------------------------------------------------
# The command line under torchrun.


@pytest.mark.slow
def test_torchrun_cli_prints_the_single_process_json_once(tiny_converted_dir: Path) -> None:
    checkpoint = tiny_converted_dir / "model.pth"
    args = ["--checkpoint-path", str(checkpoint), "--prompt", "Hello world", "--max-new-tokens", "12", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # --standalone: torchrun binds a free port itself, with no window for another process to take it.
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gpt_fast_mixtral.generate", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    output = json.loads(lines[0])
    engine = Engine.from_checkpoint(checkpoint, dtype=torch.float32, max_seq_len=64)
    expected = engine.generate(["Hello world"], [SamplingParams(max_new_tokens=12)])[0]
    assert output["tokens"] == expected.tokens and output["text"] == expected.text
    assert output["prompt_tokens"] == expected.prompt_tokens and output["finish_reason"] == expected.finish_reason


@pytest.mark.slow
def test_torchrun_cli_reports_a_bad_argument_once_before_loading_and_every_rank_exits(tiny_converted_dir: Path) -> None:
    args = ["--checkpoint-path", str(tiny_converted_dir / "model.pth"), "--prompt", "Hello world", "--top-p", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "gpt_fast_mixtral.generate", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert result.stdout == "", "the prompt is not echoed before the error"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # It was printed by each rank, after each had loaded its shard.
    assert errors == ["error: top_p must be a number in (0, 1] or None, got 2.0"], result.stderr


# ---------------------------------------------------------------------------------------------------
# The TorchServe handler with WORLD_SIZE=2, as TorchServe's torchrun workers run it.


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_handler_on_two_ranks_answers_once_from_rank_0_like_one_process(
        tiny_converted_dir: Path, tmp_path: Path, mode: str) -> None:
    rank0, rank1 = launch_ranks(2, "handler", tiny_converted_dir, tmp_path / "out", timeout=180,
                                TP_TEST_TMP=str(tmp_path), TP_TEST_MODE=mode)
    assert rank0["sharded"] == {"mode": mode, "rank": 0, "world_size": 2}
    assert rank1["sharded"] == {"mode": mode, "rank": 1, "world_size": 2}
    engine = Engine.from_checkpoint(tiny_converted_dir / "model.pth", dtype=torch.float32, max_seq_len=128)
    expected = [engine.generate([request["prompt"]], [SamplingParams(**{
        key: value for key, value in request.items() if key not in ("prompt", "stream")})])[0].text
        for request in HANDLER_REQUESTS]
    assert [status for _, status, _ in rank0["final"]] == [200] * len(HANDLER_REQUESTS)
    streamed = "".join(message[0][1] for message in rank0["streamed"])
    assert {message[0][0] for message in rank0["streamed"]} == {"req-1"}  # only the streaming request
    # Greedy answers must match exactly. The sampled one (seeded) only must arrive: sharding changes the
    # float32 summation order, and a near-tie in the sampling race may then go the other way.
    assert [rank0["final"][0][2], streamed + rank0["final"][1][2]] == expected[:2]
    assert rank0["final"][2][2]
    assert rank1["final"] == rank1["streamed"] == []  # TorchServe sends nothing from other ranks


# ---------------------------------------------------------------------------------------------------
# Two devices in float32 and bfloat16: two GPUs over NCCL (compiled CUDA-graph decode, fused expert
# kernels; skipped without them), and the same run on the CPU over gloo.

GPU_FLOAT32_REL_TOL = 1e-4  # float32 on GPUs: cuBLAS and the kernels may block their sums differently
BF16_REL_TOL = 3e-2  # bf16 rounds every operand to 8 bits (2**-8 = 4e-3) and the ranks sum in another order


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
    # the decode all-reduces through symmetric memory (tp.enable_one_shot_all_reduce), by both methods
    pytest.param("cuda-one-shot", marks=[pytest.mark.gpu,
                                         pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
    pytest.param("cuda-push", marks=[pytest.mark.gpu,
                                     pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
])
def test_two_ranks_match_one_in_float32_and_bfloat16(tiny_converted_dir: Path, tmp_path: Path, device: str) -> None:
    device, _, all_reduce = device.partition("-")
    ranks = launch_ranks(2, "devices", tiny_converted_dir, tmp_path, timeout=540, TP_TEST_DEVICE=device,
                         TP_TEST_ALL_REDUCE=all_reduce or "nccl")
    float32_tolerance = GPU_FLOAT32_REL_TOL if device == "cuda" else REL_TOL
    tokenizer = Tokenizer(tiny_converted_dir / "tokenizer.model")
    for name in CHECKPOINTS:
        for dtype, tolerance in ((torch.float32, float32_tolerance), (torch.bfloat16, BF16_REL_TOL)):
            expected = probe_logits(load_model(tiny_converted_dir / name, device=device, dtype=dtype))
            for mode in MODES:
                key = f"{name}/{mode}/{dtype}"
                for path, logits in ranks[0][f"{key}/logits"].items():
                    agree = torch.equal(ranks[1][f"{key}/logits"][path], logits)
                    where = f"ranks {'agree' if agree else 'disagree'}: {key} {path}" + (
                        "" if agree else f"; {first_differing_step(ranks, key)}")
                    error = relative_error(logits, expected[path])
                    assert error < tolerance, \
                        f"{where}; {error:.3g} from one GPU at {differing_positions(logits, expected[path], tolerance)}"
                    assert agree, where
        engine = Engine(load_model(tiny_converted_dir / name, device=device, dtype=torch.float32), tokenizer,
                        max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, compile=name == "model.pth")
        expected_tokens = reference_generations(engine)
        for mode in MODES:
            rank0, rank1 = (results[f"{name}/{mode}/generate"] for results in ranks)
            assert rank0["greedy"] == rank1["greedy"] == expected_tokens, (name, mode)
            assert rank0["sampled"] == rank1["sampled"], (name, mode)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("method", ["push", "one-shot"])
def test_decode_all_reduces_give_every_gpu_the_rank_order_sum(tmp_path: Path, method: str) -> None:
    world_size = torch.cuda.device_count()  # all of them: 2, 4 or 8 ranks
    ranks = launch_ranks(world_size, "all_reduce", tmp_path, tmp_path / "out", timeout=300, TP_TEST_DEVICE="cuda",
                         TP_TEST_ALL_REDUCE=method)
    # The push kernel takes every size of all three dtypes. PyTorch's kernel takes whole 4-byte words of
    # bfloat16 and float32 only: odd bfloat16 sizes and all float16 go to NCCL.
    eager_calls, graph_calls = 24, 5 * 4  # per dtype, each size three times
    if method == "push":
        to_nccl, calls = [], 3 * (eager_calls + graph_calls)
    else:
        odd = [1, 37, 32773]
        to_nccl = sorted([("torch.bfloat16", n) for n in odd] +
                         [("torch.float16", n) for n in (*odd, 4096, 12288, ONE_SHOT_MAX_BYTES // 2)])
        calls = 2 * (eager_calls + graph_calls) - 3 * len(odd)
    for rank, result in enumerate(ranks):
        assert result["wrong"] == [], (rank, result["wrong"])
        assert result["to_nccl"] == to_nccl
        assert result["calls"] == calls


def differing_positions(logits: torch.Tensor, expected: torch.Tensor, tolerance: float) -> str:
    """The (batch row, position) pairs whose logits [B, T, V] have a relative error (relative_error's
    measure, per position) above `tolerance`: the first 12."""
    error = (logits.float() - expected.float()).norm(dim=-1) / expected.float().norm(dim=-1)
    return str((error > tolerance).nonzero().tolist()[:12])


def first_differing_step(ranks: list[dict], key: str) -> str:
    """Which traced step of the probes (tp_ranks.traced_steps: the all-reduces, the blocks' outputs,
    the output head's input and output, in order) first gave the two ranks different outputs, if any."""
    traces = [rank[f"{key}/trace"] for rank in ranks]
    if len(traces[0]) != len(traces[1]):
        return f"the ranks traced {len(traces[0])} and {len(traces[1])} steps"
    for (label, a), (_, b) in zip(*traces, strict=True):
        if not torch.equal(a, b):
            differing = (a != b).sum().item()
            largest = (a.float() - b.float()).abs().max().item()
            return (f"{label} of {len(traces[0])} traced steps ({a.numel()} elements) differs first, in {differing} "
                    f"elements, by up to {largest:.3g}")
    return f"all {len(traces[0])} traced steps agree: the difference arose after the output head"


def test_all_reduce_references_round_once_or_after_every_add() -> None:
    generator = torch.Generator().manual_seed(0)
    parts = [(torch.randn(4096, generator=generator) * 10 ** rank).bfloat16() for rank in range(4)]
    once, each = reference_all_reduce(parts), reference_all_reduce(parts, round_each_add=True)
    exact = sum(part.double() for part in parts)
    assert torch.equal(once, exact.bfloat16())  # rounded once (float32's own rounding is far below bfloat16's)
    stepwise = parts[0]
    for part in parts[1:]:
        stepwise = (stepwise.double() + part.double()).bfloat16()  # one correctly rounded add at a time
    assert torch.equal(each, stepwise)
    assert not torch.equal(each, once)  # four bfloat16 ranks: the two orders of rounding differ
    two = (parts[0].double() + parts[1].double()).bfloat16()
    for method in (True, False):  # two ranks: one add, so both round once
        assert torch.equal(reference_all_reduce(parts[:2], round_each_add=method), two)
    float32 = [part.float() for part in parts]
    assert torch.equal(reference_all_reduce(float32, round_each_add=True), reference_all_reduce(float32))


def test_an_unknown_all_reduce_is_refused_before_joining() -> None:
    with pytest.raises(ValueError, match="all_reduce must be one of push, one-shot, nccl"):
        init_process_group(torch.device("cpu"), "ring")
    assert not torch.distributed.is_initialized()


def test_one_shot_all_reduce_is_not_enabled_without_nccl() -> None:
    assert enable_one_shot_all_reduce() is False  # no process group here; gloo would refuse the same way
