"""One rank of a tensor-parallel test run: `python tests/tp_ranks.py SCENARIO OUT_DIR ARGS...`.

tests/test_tp.py starts WORLD_SIZE of these with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set, as torchrun would. Every rank saves what it computed to OUT_DIR/rank<R>.pt; the test compares the
ranks with each other and with the unsharded model, computed by the same functions here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

TESTS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS_DIR.parent), str(TESTS_DIR)]  # the checkout's packages, and serving_utils

from gpt_fast_mixtral.checkpoint import load_model  # noqa: E402
from gpt_fast_mixtral.generate import (  # noqa: E402
    Engine,
    SamplingParams,
    exit_rank,  # noqa: E402
)
from gpt_fast_mixtral.model import Transformer  # noqa: E402
from gpt_fast_mixtral.tokenizer import Tokenizer  # noqa: E402
from gpt_fast_mixtral.tp import (  # noqa: E402
    apply_tensor_parallel,
    init_process_group,
    leave_process_group,
)

MAX_BATCH, MAX_SEQ_LEN = 3, 64
CHECKPOINTS = ("model.pth", "model_int8.pth")
MODES = ("tp", "ep")
PROMPTS = ["Hello world", "def main(argv):\n    return", "The quick brown fox jumps over"]
GREEDY_TOKENS = 16
# What the handler run asks for; the test computes the expected answers from the same list.
HANDLER_REQUESTS: list[dict[str, Any]] = [
    {"prompt": "The capital of France", "max_new_tokens": 12},
    {"prompt": "import os", "max_new_tokens": 16, "stream": True},
    {"prompt": "class Point:", "max_new_tokens": 10, "temperature": 0.8, "top_k": 50, "seed": 7},
]


@torch.inference_mode()
def probe_logits(model: Transformer) -> dict[str, torch.Tensor]:
    """Full logits of fixed random tokens, sized for each PyTorch expert path: 3 x 30 tokens take the
    grouped path (more than 64 tokens), 3 x 4 the dense one, a single token the gathered one (under
    ep with few local experts, the dense one again)."""
    model.setup_caches(MAX_BATCH, MAX_SEQ_LEN)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.args.vocab_size, (MAX_BATCH, 30), generator=generator).to(model.device)
    logits = {}
    for path, (batch, length) in {"grouped": (3, 30), "dense": (3, 4), "gathered": (1, 1)}.items():
        positions = torch.arange(length, device=model.device).expand(batch, length)
        logits[path] = model(tokens[:batch, :length], positions).float().cpu()
    return logits


@torch.inference_mode()
def compiled_decode_matches(model: Transformer) -> bool:
    """Whether a decode step compiled whole (fullgraph, so the all-reduces must trace) gives the eager logits."""
    model.setup_caches(MAX_BATCH, MAX_SEQ_LEN)
    tokens = torch.tensor([[5], [6], [7]])
    positions = torch.tensor([[0], [0], [0]])
    eager = model(tokens, positions)
    compiled = torch.compile(model, backend="eager", fullgraph=True)(tokens, positions)
    return torch.equal(eager, compiled)


def generations(engine: Engine) -> dict[str, list[list[int]]]:
    greedy = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=GREEDY_TOKENS)] * len(PROMPTS))
    # No seed: each rank draws its own, and the engine must make them agree.
    sampled = engine.generate(PROMPTS[:1], [SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=1.0)])
    return {"greedy": [r.tokens for r in greedy], "sampled": [r.tokens for r in sampled]}


def shard(rank: int, world_size: int, mode: str):
    return partial(apply_tensor_parallel, rank=rank, world_size=world_size, mode=mode)


def run_engine(checkpoint_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """Every checkpoint and mode: probe logits, greedy and unseeded generation, and a compiled step."""
    tokenizer = Tokenizer(checkpoint_dir / "tokenizer.model")
    results: dict[str, Any] = {}
    for name in CHECKPOINTS:
        for mode in MODES:
            model = load_model(checkpoint_dir / name, dtype=torch.float32,
                               transform=shard(rank, world_size, mode))
            results[f"{name}/{mode}/logits"] = probe_logits(model)
            engine = Engine(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN)
            results[f"{name}/{mode}/generate"] = generations(engine)
            if name == "model.pth":
                results[f"{name}/{mode}/compiled"] = compiled_decode_matches(model)
    return results


def run_logits(checkpoint_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    return {f"{name}/{mode}/logits": probe_logits(load_model(checkpoint_dir / name, dtype=torch.float32,
                                                             transform=shard(rank, world_size, mode)))
            for name in CHECKPOINTS for mode in MODES}


def run_devices(checkpoint_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """On this rank's GPU (NCCL; or the CPU over gloo where TP_TEST_DEVICE=cpu): probe logits in float32 and
    bfloat16, and float32 greedy and unseeded tokens (model.pth's from a compiled decode step, on CUDA)."""
    device = rank_device()
    tokenizer = Tokenizer(checkpoint_dir / "tokenizer.model")
    results: dict[str, Any] = {}
    for name in CHECKPOINTS:
        for mode in MODES:
            for dtype in (torch.bfloat16, torch.float32):  # the float32 model then generates
                model = load_model(checkpoint_dir / name, device=device, dtype=dtype,
                                   transform=partial(apply_tensor_parallel, rank=rank, world_size=world_size,
                                                     mode=mode, device=device))
                with traced_steps(model) as trace:
                    results[f"{name}/{mode}/{dtype}/logits"] = probe_logits(model)
                results[f"{name}/{mode}/{dtype}/trace"] = trace
            # Compiling takes a while per model: the int8 ones decode eagerly (with the fused kernels still).
            engine = Engine(model, tokenizer, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN,
                            compile=name == "model.pth")
            results[f"{name}/{mode}/generate"] = generations(engine)
    return results


def run_all_reduce(_: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The decode all-reduce (TP_TEST_ALL_REDUCE's method) against the rank-order sum (reference_all_reduce:
    in float32 for push, rounded after every add for PyTorch's one-shot), which every rank computes from
    all ranks' parts (each drawn from a seed of its rank and call): eagerly, over
    sizes from 1 element to the whole buffer, and replayed from a CUDA graph of four calls (which moves
    the push method's phases on by one each replay). Returns the calls that differed, and the sizes that
    the method leaves to NCCL (its `fits`), which are not run."""
    from gpt_fast_mixtral.kernels.allreduce import reference_all_reduce
    from gpt_fast_mixtral.tp import _ONE_SHOT, ONE_SHOT_MAX_BYTES, one_shot_all_reduce

    device = rank_device()
    group_name = torch.distributed.group.WORLD.group_name

    def parts(call: int, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        drawn = []
        for source in range(world_size):
            generator = torch.Generator(device).manual_seed(1000 * call + source)
            part = torch.randn(numel, generator=generator, device=device).to(dtype)
            part[source::5] = -0.0  # the push method's empty-slot pattern, which it must still sum right
            drawn.append(part)
        return drawn

    # PyTorch's kernel rounds after every add: with more than two ranks, bfloat16 sums differ from push's
    rank_order_sum = partial(reference_all_reduce,
                             round_each_add=os.environ.get("TP_TEST_ALL_REDUCE") == "one-shot")
    wrong, calls, to_nccl = [], 0, set()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        capacity = ONE_SHOT_MAX_BYTES // dtype.itemsize
        for call, numel in enumerate([4096, 1, 37, 8 * 4096 + 5, capacity, 4096, 4096, 12288] * 3):
            drawn = parts(call, numel, dtype)
            if not _ONE_SHOT[group_name][dtype].fits(drawn[rank]):
                to_nccl.add((str(dtype), numel))
                continue
            if not torch.equal(one_shot_all_reduce(drawn[rank], call % 2, group_name), rank_order_sum(drawn)):
                wrong.append((str(dtype), "eager", call, numel))
            calls += 1
        static = [torch.zeros(4096, dtype=dtype, device=device) for _ in range(4)]
        if not _ONE_SHOT[group_name][dtype].fits(static[0]):
            continue  # this dtype goes to NCCL whatever its size (the eager calls recorded it)
        for index, tensor in enumerate(static):  # warm up the kernels outside the capture
            one_shot_all_reduce(tensor, index % 2, group_name)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = [one_shot_all_reduce(tensor, index % 2, group_name) for index, tensor in enumerate(static)]
        for replay in range(5):
            expected = []
            for index, tensor in enumerate(static):
                drawn = parts(100 + 10 * replay + index, 4096, dtype)
                tensor.copy_(drawn[rank])
                expected.append(rank_order_sum(drawn))
            graph.replay()
            for index, (output, reference) in enumerate(zip(outputs, expected, strict=True)):
                if not torch.equal(output, reference):
                    wrong.append((str(dtype), "graph", replay, index))
                calls += 1
        if os.environ.get("TP_TEST_ALL_REDUCE") == "push":
            wrong += fused_all_reduce_errors(dtype, parts, rank)
    torch.cuda.synchronize()
    return {"wrong": wrong, "calls": calls, "to_nccl": sorted(to_nccl)}


def fused_all_reduce_errors(dtype: torch.dtype, parts, rank: int) -> list[tuple]:
    """The push all-reduce fused with the residual add, the norm and the routing (tp.push_residual_norm and
    push_residual_norm_route, eagerly and in a CUDA graph) against kernels.router's reference on the
    rank-order sum; returns what differed."""
    from gpt_fast_mixtral.kernels.allreduce import reference_all_reduce
    from gpt_fast_mixtral.kernels.moe import block_end
    from gpt_fast_mixtral.kernels.router import reference_residual_norm_route
    from gpt_fast_mixtral.tp import push_residual_norm, push_residual_norm_partials, push_residual_norm_route

    device, dim, group_name = rank_device(), 4096, torch.distributed.group.WORLD.group_name
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    generator = torch.Generator(device).manual_seed(7)  # the same on every rank: replicated weights
    norm_weight = (torch.rand(dim, generator=generator, device=device) + 0.5).to(dtype)
    gate = (torch.randn(8, dim, generator=generator, device=device) * 0.05).to(dtype)

    def check(label, got, partials, x) -> list[tuple]:
        expected = reference_residual_norm_route(x, reference_all_reduce(partials), norm_weight, 1e-5, gate, 2)
        errors = []
        if not torch.equal(got[0], expected[0]):
            errors.append((str(dtype), label, "h"))
        if (got[1].float() - expected[1].float()).norm() > bound * expected[1].float().norm():
            errors.append((str(dtype), label, "normed"))
        if len(got) == 4:
            # the same experts wherever the k-th and the next logit are not within rounding of each other
            logits = (expected[1].float() @ gate.float().T).sort(dim=1, descending=True).values
            clear = logits[:, 1] - logits[:, 2] > 0.05
            if (got[3] != expected[3])[clear].any():
                errors.append((str(dtype), label, "ids"))
        return errors

    errors = []
    for call, rows in enumerate([1, 3, 8, 1, 5, 2]):
        drawn = [part.view(rows, dim) for part in parts(500 + call, rows * dim, dtype)]
        x = parts(900 + call, rows * dim, dtype)[0].view(rows, dim)
        if call % 2:
            got = push_residual_norm(drawn[rank], x, norm_weight, 1e-5, group_name)
        else:
            got = push_residual_norm_route(drawn[rank], x, norm_weight, 1e-5, gate, 2, group_name)
        errors += check(f"eager {call}", got, drawn, x)
    # this rank's part as the experts' float32 partials [split, rows * 2, dim], which the push kernel sums in
    # kernels.moe.block_end's order (tp.push_residual_norm_partials): h the same bits as through block_end
    for call, (rows, split) in enumerate([(1, 2), (3, 1), (2, 3)]):
        ys = [torch.randn(split, rows * 2, dim, device=device,
                          generator=torch.Generator(device).manual_seed(4000 + 10 * call + source))
              for source in range(torch.distributed.get_world_size())]
        sums = [block_end(y, 2, dtype) for y in ys]
        x = parts(950 + call, rows * dim, dtype)[0].view(rows, dim)
        got = push_residual_norm_partials(ys[rank], 2, x, norm_weight, 1e-5, group_name)
        errors += check(f"partials {call}", got, sums, x)
    # in a CUDA graph, between two plain all-reduces (the phases are shared)
    static = torch.zeros(3, dim, dtype=dtype, device=device)
    x = torch.zeros_like(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = push_residual_norm_route(static, x, norm_weight, 1e-5, gate, 2, group_name)
    for replay in range(4):
        drawn = [part.view(3, dim) for part in parts(700 + replay, 3 * dim, dtype)]
        static.copy_(drawn[rank])
        x.copy_(parts(800 + replay, 3 * dim, dtype)[1].view(3, dim))
        graph.replay()
        errors += check(f"graph {replay}", outputs, drawn, x)
    return errors


@contextlib.contextmanager
def traced_steps(model: Transformer | None = None):
    """Collects (label, output) of every tp.all_reduce (one-shot or NCCL; eager calls only) made inside and,
    given the model, of every block and of the output head (its input, the final norm's output, and its
    output), in the order they ran; moved to the CPU on the way out. When ranks disagree, the test can tell
    an all-reduce that gave the ranks different sums from a replicated computation that is not
    deterministic, and which one. Copies stay on the device until then: a copy to the CPU after each step
    would synchronise, and hide a missing stream wait."""
    from gpt_fast_mixtral import tp

    trace: list[tuple[str, torch.Tensor]] = []
    original = tp.all_reduce
    reduces = itertools.count()

    def traced(x: torch.Tensor, group, buffer_index: int) -> torch.Tensor:
        out = original(x, group, buffer_index)
        trace.append((f"all-reduce {next(reduces)}", out.clone()))
        return out

    hooks = []
    if model is not None:
        for index, layer in enumerate(model.layers):
            hooks.append(layer.register_forward_hook(
                lambda module, args, out, index=index: trace.append((f"block {index}'s output", out[0].clone()))))
        hooks.append(model.output.register_forward_pre_hook(
            lambda module, args: trace.append(("the output head's input", args[0].clone()))))
        hooks.append(model.output.register_forward_hook(
            lambda module, args, out: trace.append(("the output head's output", out.clone()))))
    tp.all_reduce = traced
    try:
        yield trace
    finally:
        tp.all_reduce = original
        for hook in hooks:
            hook.remove()
        trace[:] = [(label, out.cpu()) for label, out in trace]


def rank_device() -> torch.device:
    if os.environ.get("TP_TEST_DEVICE", "cpu") == "cuda":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def run_handler(converted_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    """The handler inside TorchServe's worker machinery, as each process torchrun starts for it."""
    from serving_utils import Worker, make_model_dir

    model_dir = make_model_dir(Path(os.environ["TP_TEST_TMP"]) / f"model{rank}", converted_dir,
                               parallel_mode=os.environ["TP_TEST_MODE"])
    worker = Worker(model_dir)
    final, streamed = worker.predict(*HANDLER_REQUESTS)
    return {"final": [(r.request_id, r.status, r.text) for r in final],
            "streamed": [[(r.request_id, r.text) for r in message] for message in streamed],
            "sharded": dataclasses.asdict(worker.handler.engine.model.parallelism)}


SCENARIOS = {"engine": run_engine, "logits": run_logits, "devices": run_devices, "handler": run_handler,
             "all_reduce": run_all_reduce}


def main() -> None:
    scenario, out_dir, source = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if scenario != "handler":  # the handler joins the process group itself
        init_process_group(rank_device(), os.environ.get("TP_TEST_ALL_REDUCE", "nccl"))
    results = SCENARIOS[scenario](source, rank, world_size)
    torch.save(results, out_dir / f"rank{rank}.pt")
    leave_process_group()  # together (see generate.main)


if __name__ == "__main__":
    main()
    exit_rank(0)  # see gpt_fast_mixtral.generate.exit_rank
