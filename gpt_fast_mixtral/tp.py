"""Tensor and expert parallelism, as a transform that shards the plain model in place.

Both modes split attention the same way: every rank holds n_heads / W query heads and n_kv_heads / W
key-value heads (its rows of the fused wqkv, its columns of wo, its share of the KV cache). They differ in
how the experts are split:

- "tp": every rank holds every expert, sliced along the intermediate dimension (its rows of w1 and w3,
  its columns of w2), as in Megatron's column- then row-parallel MLP.
- "ep": every rank holds E / W whole experts, [rank * E / W, (rank + 1) * E / W), as LLaMA2-Accessory's
  distributed MoE does. The router runs replicated on every rank; a token slot routed to another rank's
  expert contributes nothing locally.

In both, the output of each attention block and of each MoE block is a partial sum on every rank, and
one all-reduce completes it: two all-reduces per layer. Sharding turns each block into a
TensorParallelBlock (same modules and weights), which runs them, so model.py has no parallel branches.
NCCL's go through functional collectives and ours through custom ops, which
`torch.compile(fullgraph=True)` traces into a CUDA-graph decode step.

Attention under "ep" is split rather than replicated: replication would keep the whole KV cache and the
whole attention weights on every rank and repeat the same attention work W times, to save an all-reduce
of one [tokens, dim] activation.

The router gate, the norms, the embedding and the output head stay replicated. Sharding takes slices and
copies them (to `device` when given), so a rank keeps only its part, not a view that pins the whole
(possibly memory-mapped) tensor; on the meta device it only changes shapes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from gpt_fast_mixtral.config import ModelArgs
from gpt_fast_mixtral.model import (
    Attention,
    ConditionalFeedForward,
    MOEFeedForward,
    RMSNorm,
    Transformer,
    TransformerBlock,
)

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("tp", "ep")
ALL_REDUCES = ("push", "one-shot", "nccl")
MAX_LISTED_WORLD_SIZE = 64


@dataclass(frozen=True)
class Parallelism:
    """How a model was sharded; set as `model.parallelism` so that a second sharding is refused."""

    mode: str
    rank: int
    world_size: int


def _split_shapes(args: ModelArgs, mode: str) -> dict[str, int]:
    """The config values (named as in config.json) that each rank must divide evenly."""
    shapes = {"num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads}
    if mode == "tp":
        shapes["intermediate_size"] = args.intermediate_size
    else:
        shapes["num_local_experts"] = args.num_experts
    return shapes


def valid_world_sizes(args: ModelArgs, mode: str) -> list[int]:
    """World sizes (up to MAX_LISTED_WORLD_SIZE) over which `mode` can split this model."""
    shapes = _split_shapes(args, mode).values()
    return [size for size in range(1, MAX_LISTED_WORLD_SIZE + 1) if all(value % size == 0 for value in shapes)]


def check_parallel(args: ModelArgs, world_size: int, mode: str = "tp") -> None:
    """Raise ValueError, naming the numbers and the world sizes that work, if `mode` cannot split the
    model over `world_size` ranks."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    shapes = _split_shapes(args, mode)
    indivisible = [f"{name} ({value})" for name, value in shapes.items() if value % world_size]
    if indivisible:
        sizes = [str(size) for size in valid_world_sizes(args, mode) if size > 1]
        possible = (f"{mode} can split this model over {_listing(sizes, 'or')} ranks" if sizes
                    else f"{mode} cannot split this model over any number of ranks")
        raise ValueError(
            f"{mode} over {world_size} ranks divides {_listing(list(shapes))} among the ranks, but "
            f"{world_size} does not divide {_listing(indivisible)}; {possible}")


def _listing(items: list[str], conjunction: str = "and") -> str:
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}" if len(items) > 1 else items[0]


def init_process_group(device: torch.device, all_reduce: str = "push") -> None:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL when `device` is a GPU (this rank's own, by LOCAL_RANK), gloo on the CPU.

    all_reduce (GPUs only; see enable_one_shot_all_reduce): "push" (the default) sends decode-sized
    all-reduces through our push kernel over symmetric memory, "one-shot" through PyTorch's
    symmetric-memory one-shot kernel; "nccl" leaves every all-reduce to NCCL."""
    if all_reduce not in ALL_REDUCES:
        raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCES)}, got {all_reduce!r}")
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        if all_reduce != "nccl":
            enable_one_shot_all_reduce((torch.bfloat16, torch.float16, torch.float32), method=all_reduce)
    else:
        dist.init_process_group("gloo")


# Decode-sized all-reduces in one kernel (enable_one_shot_all_reduce): per process group and activation
# dtype, the object that runs them.
_ONE_SHOT: dict[str, dict[torch.dtype, _PushOneShot | _SymmMemOneShot]] = {}
ONE_SHOT_MAX_BYTES = 256 * 1024


class _SymmMemOneShot:
    """PyTorch's kernel (symm_mem.one_shot_all_reduce_copy_out): copy into our symmetric buffer, a barrier
    of all ranks, then read every rank's buffer and add. Two buffers, used in turn by the attention and the
    MoE all-reduce of a layer, so that a rank starting the next all-reduce cannot overwrite what a slower
    peer still reads (each begins with a barrier)."""

    def __init__(self, dtype: torch.dtype, group: dist.ProcessGroup, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name, self.buffers = group.group_name, []
        for _ in range(2):
            buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=torch.cuda.current_device())
            symm_mem.rendezvous(buffer, self.group_name)
            self.buffers.append(buffer)

    # PyTorch's kernel (torch 2.11) adds bfloat16 and float32, not float16, and only whole 4-byte words
    DTYPES = (torch.bfloat16, torch.float32)

    def fits(self, x: Tensor) -> bool:
        return (x.dtype in self.DTYPES and x.numel() <= self.buffers[0].numel()
                and x.numel() * x.element_size() % 4 == 0)

    def __call__(self, x: Tensor, buffer_index: int) -> Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        staging = self.buffers[buffer_index][:x.numel()].view_as(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, x, "sum", self.group_name, out)
        return out


class _PushOneShot:
    """kernels.allreduce.PushAllReduce over a symmetric-memory receive buffer: each rank writes its part
    into every peer's buffer and reads only its own (one NVLink latency instead of a barrier and remote
    reads)."""

    def __init__(self, dtype: torch.dtype, group: dist.ProcessGroup, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from gpt_fast_mixtral.kernels import allreduce

        device = torch.cuda.current_device()
        capacity = max_bytes // dtype.itemsize
        world_size = dist.get_world_size(group)
        self.buffer = symm_mem.empty(allreduce.buffer_elements(world_size, capacity),
                                     dtype=allreduce.bits_dtype(dtype), device=device)
        handle = symm_mem.rendezvous(self.buffer, group.group_name)
        self.buffer.fill_(allreduce.sentinel(dtype))  # every peer waits for all to get here before pushing
        # every rank's address of its buffer (at the same offset into each rank's allocation as ours)
        offset = self.buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        addresses = torch.tensor([base + offset for base in handle.buffer_ptrs], dtype=torch.int64, device=device)
        counters = torch.zeros(allreduce.PROGRAMS, dtype=torch.int32, device=device)
        self.run = allreduce.PushAllReduce(dtype, handle.rank, world_size, capacity, addresses, counters)

    def fits(self, x: Tensor) -> bool:
        return self.run.fits(x)

    def __call__(self, x: Tensor, buffer_index: int) -> Tensor:
        return self.run(x)


_ONE_SHOT_METHODS = {"push": _PushOneShot, "one-shot": _SymmMemOneShot}


def enable_one_shot_all_reduce(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
                               group: dist.ProcessGroup | None = None,
                               max_bytes: int = ONE_SHOT_MAX_BYTES, method: str = "push") -> bool:
    """All-reduce outputs of up to `max_bytes` (a decode step's activations) in one kernel through
    symmetric memory, which peers read and write directly over NVLink. NCCL's ring needs several kernel
    steps for the 8 KB of a batch-1 decode step. Larger outputs (prefill) stay on NCCL.

    method "push" (kernels.allreduce): every rank writes its partial sum into every rank's receive buffer
    and waits on its own; "one-shot": PyTorch's symm_mem kernel (a barrier, then every rank reads all W
    buffers). Both add the W parts in rank order, so every rank gets the same sum; push adds in float32
    and rounds once, PyTorch's kernel rounds to the activations' dtype after every add (the same as
    float32 for two ranks, not for more in bfloat16: see kernels.allreduce.reference_all_reduce).

    Only for NCCL groups on GPUs: returns False and changes nothing otherwise. A collective: every rank
    calls it, after init_process_group. NVLink multicast is not needed.
    """
    if method not in _ONE_SHOT_METHODS:
        raise ValueError(f"method must be one of {', '.join(_ONE_SHOT_METHODS)}, got {method!r}")
    if not dist.is_initialized() or dist.get_backend(group) != "nccl":
        return False
    # Both read or write peers' memory directly; neither needs an NVLink multicast object, and on shared
    # hosts creating one can take the GPUs out of service: unless the user chose otherwise, the allocator
    # is told not to (it reads this when it first allocates).
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    group = group or dist.group.WORLD
    try:
        runners = {dtype: _ONE_SHOT_METHODS[method](dtype, group, max_bytes) for dtype in dtypes}
        torch.cuda.synchronize()  # the push buffers hold their sentinel before the agreement below ends
        ready = 1
    except Exception as error:  # e.g. GPUs without peer access: NCCL does all the all-reduces then
        logger.warning("%s all-reduce unavailable on rank %d (%s: %s); all-reduces use NCCL", method,
                       dist.get_rank(), type(error).__name__, error)
        ready = 0
    # Every rank must choose alike, or one would wait in a one-shot kernel while another runs NCCL.
    agreed = torch.tensor([ready], device=torch.cuda.current_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    if not agreed.item():
        return False
    _ONE_SHOT[group.group_name] = runners
    return True


@torch.library.custom_op("gpt_fast_mixtral::one_shot_all_reduce", mutates_args=())
def one_shot_all_reduce(x: Tensor, buffer_index: int, group_name: str) -> Tensor:
    """Sum of x over the ranks of `group_name` by the method enable_one_shot_all_reduce set up;
    `buffer_index` (0 or 1) alternates between consecutive all-reduces (the "one-shot" method's buffers).

    Opaque to torch.compile: the buffers live outside the CUDA graphs' memory pool."""
    return _ONE_SHOT[group_name][x.dtype](x, buffer_index)


@one_shot_all_reduce.register_fake
def _(x: Tensor, buffer_index: int, group_name: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _runner(group: dist.ProcessGroup | None, dtype: torch.dtype) -> _PushOneShot | _SymmMemOneShot | None:
    """What enable_one_shot_all_reduce set up for `group` (default: the world) and dtype, if anything."""
    return _ONE_SHOT.get((group or dist.group.WORLD).group_name, {}).get(dtype)


def all_reduce(x: Tensor, group: dist.ProcessGroup | None, buffer_index: int) -> Tensor:
    """Sum of x over the ranks of `group` (default: the world): one-shot through symmetric buffer
    `buffer_index` when enabled and x fits, else NCCL (gloo on CPUs)."""
    runner = _runner(group, x.dtype)
    if runner is not None and runner.fits(x):
        return one_shot_all_reduce(x, buffer_index, (group or dist.group.WORLD).group_name)
    # wait_tensor hands back a plain tensor: the AsyncCollectiveTensor subclass that funcol returns
    # would otherwise travel through the rest of the eager forward pass.
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group or dist.group.WORLD))


def push_fuses(group: dist.ProcessGroup | None, x: Tensor, gate_weight: Tensor | None = None) -> bool:
    """Whether `group` all-reduces x's dtype by the push method and can fuse the residual add and norm (and
    the routing, with gate_weight) for x [N, D] (kernels.allreduce.PushAllReduce.residual_norm)."""
    runner = _runner(group, x.dtype)
    return isinstance(runner, _PushOneShot) and runner.run.fits_rows(x, gate_weight)


@torch.library.custom_op("gpt_fast_mixtral::push_residual_norm", mutates_args=())
def push_residual_norm(partial: Tensor, x: Tensor, norm_weight: Tensor, eps: float,
                       group_name: str) -> tuple[Tensor, Tensor]:
    """h = x + the sum of `partial` over the ranks, and RMSNorm(h) * norm_weight, for [N, D] rows: one
    kernel (PushAllReduce.residual_norm). Opaque to torch.compile, as one_shot_all_reduce."""
    return _ONE_SHOT[group_name][partial.dtype].run.residual_norm(partial, x, norm_weight, eps)


@push_residual_norm.register_fake
def _(partial: Tensor, x: Tensor, norm_weight: Tensor, eps: float, group_name: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gpt_fast_mixtral::push_residual_norm_partials", mutates_args=())
def push_residual_norm_partials(partials: Tensor, top_k: int, x: Tensor, norm_weight: Tensor, eps: float,
                                group_name: str) -> tuple[Tensor, Tensor]:
    """push_residual_norm of this rank's experts' sum given as the fused decode kernels' float32 partials
    [split, N * top_k, D] (ConditionalFeedForward.expert_partials), which the push kernel sums itself:
    the same bits, without kernels.moe.block_end's kernel."""
    return _ONE_SHOT[group_name][x.dtype].run.residual_norm_partials(partials, top_k, x, norm_weight, eps)


@push_residual_norm_partials.register_fake
def _(partials: Tensor, top_k: int, x: Tensor, norm_weight: Tensor, eps: float,
      group_name: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gpt_fast_mixtral::push_residual_norm_route", mutates_args=())
def push_residual_norm_route(partial: Tensor, x: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                             top_k: int, group_name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """push_residual_norm and the routing of the normed rows (weights [N, top_k] in x's dtype, int64
    expert ids), as kernels.router.residual_norm_route does after a separate all-reduce."""
    return _ONE_SHOT[group_name][partial.dtype].run.residual_norm(partial, x, norm_weight, eps, gate_weight, top_k)


@push_residual_norm_route.register_fake
def _(partial: Tensor, x: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor, top_k: int,
      group_name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(rows, top_k), x.new_empty(rows, top_k, dtype=torch.int64))


def leave_process_group(timeout_s: float = 120.0) -> None:
    """Wait until every rank got here, then leave the process group; call it once the work is done.

    Under gloo: a barrier, then the group is destroyed. Under NCCL the communicators are left alone (the
    process is about to end): on H200s with torch 2.11, ranks whose decode step was a CUDA graph with
    all-reduces in it hung in the teardown after all their work, and torchrun waited on them. The
    barrier there goes through torchrun's TCP store, not through NCCL.
    """
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.barrier()
        dist.destroy_process_group()
        return
    torch.cuda.synchronize()
    store = dist.distributed_c10d._get_default_store()
    key = "gpt_fast_mixtral/leave"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < dist.get_world_size() and time.monotonic() < deadline:
        time.sleep(0.01)


def apply_tensor_parallel(model: Transformer, rank: int, world_size: int, mode: str = "tp",
                          device: torch.device | str | None = None,
                          group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep rank `rank`'s part of every split weight of `model` and insert the all-reduces, in place.

    Works on float and int8 (quantize.py) models, loaded, memory-mapped or on the meta device. `device`
    receives the shards directly (each rank then copies only its part to its GPU); the replicated weights
    stay where they are. The all-reduces run over `group` (default: the whole world), which must be
    initialised before the model runs, not before it is sharded.
    """
    check_parallel(model.args, world_size, mode)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if getattr(model, "parallelism", None) is not None:
        raise ValueError(f"the model is already sharded ({model.parallelism}); load it again to shard it anew")
    if world_size > 1:
        same_kernel_configs_on_every_rank()
    shard = _Sharder(rank, world_size, device)
    for layer in model.layers:
        shard.attention(layer.attention)
        moe: MOEFeedForward = layer.block_sparse_moe
        if mode == "tp":
            shard.experts_by_intermediate(moe.cond_ffn)
        else:
            moe.cond_ffn = shard.experts_whole(moe.cond_ffn)
        if world_size > 1:
            layer.__class__ = TensorParallelBlock  # same modules and weights; it adds the all-reduces
            layer.group = group
    model.parallelism = Parallelism(mode, rank, world_size)
    return model


def same_kernel_configs_on_every_rank() -> None:
    """Have Inductor choose its kernels' launch configurations without timing them (its deterministic
    mode), process-wide.

    Inductor gives a reduction (an RMSNorm, a softmax over the vocabulary) several candidate block sizes and
    keeps the fastest at its first run, timed in this process. Ranks time separately, so two ranks can keep
    different ones, which sum in different orders: the same input then gives different bits on each rank
    (seen as float32 logits 1e-6 apart on two H200s), and sampled or near-tied greedy tokens can differ
    between ranks that must agree. Deterministic mode keeps one configuration chosen by rule."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True
    else:  # older torch: no such mode; ranks may still disagree in the last bits
        logger.warning("torch %s has no deterministic Inductor mode: ranks may compute different bits",
                       torch.__version__)


class ExpertParallelExperts(nn.Module):
    """One rank's experts of one layer, [first_expert, first_expert + E_local), called with global ids.

    A slot routed to another rank's expert gets id -1 (no expert) and routing weight 0 here and
    contributes nothing; the all-reduce after the MoE block adds every rank's share. The fused kernels
    skip such slots (no weight is read for them); the PyTorch paths run them through local expert 0 at
    weight 0 (the dense and grouped paths cost nothing extra for it, the gathered one a slot's work).
    """

    def __init__(self, experts: ConditionalFeedForward, first_expert: int) -> None:
        super().__init__()
        self.experts = experts
        self.first_expert = first_expert

    def extra_repr(self) -> str:
        return f"first_expert={self.first_expert}, local_experts={self.experts.w1.shape[0]}"

    def forward(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor:
        return self.experts(x, *self._local(expert_weights, expert_indices))

    def expert_partials(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor | None:
        """ConditionalFeedForward.expert_partials of this rank's experts."""
        return self.experts.expert_partials(x, *self._local(expert_weights, expert_indices))

    def _local(self, expert_weights: Tensor, expert_indices: Tensor) -> tuple[Tensor, Tensor]:
        """The routing with local expert ids; other ranks' slots get id -1 and weight 0."""
        num_local = self.experts.w1.shape[0]
        local = expert_indices - self.first_expert
        here = (local >= 0) & (local < num_local)
        return expert_weights.masked_fill(~here, 0), local.masked_fill(~here, -1)


class TensorParallelBlock(TransformerBlock):
    """A TransformerBlock whose attention and experts hold one rank's share (either mode): their outputs
    are partial sums, which it all-reduces over `group`.

    With the push all-reduce (and the fused router), each all-reduce is one kernel together with what
    follows it: after the attention, the residual add, ffn_norm and the routing; after the experts, the
    residual add and the next block's attention_norm (or the final norm), which it returns for the next
    block. A decode layer then runs the push kernel twice instead of the all-reduce, router, all-reduce
    and residual + norm kernels. Otherwise (other all-reduces, prefill-sized rows) the plain block's
    steps with tp.all_reduce after the attention and the experts.
    """

    group: dist.ProcessGroup | None = None
    # False: the separate all-reduce kernels even where the fused ones apply (comparisons:
    # scripts/benchmark.py --no-fused-all-reduce)
    fused_all_reduce = True
    # With the fused push after the experts: the push kernel sums the experts' float32 partials itself
    # (push_residual_norm_partials) instead of kernels.moe.block_end's kernel before it; the same bits.
    # False: block_end, then the push (comparisons: scripts/benchmark.py --no-fold-expert-sum).
    fold_expert_sum = True

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, kv_len: int | None,
                normed: Tensor | None = None, next_norm: RMSNorm | None = None) -> tuple[Tensor, Tensor | None]:
        attended = self.attention(self.attention_norm(x) if normed is None else normed, cos, sin, input_pos, kv_len)
        moe, shape = self.block_sparse_moe, x.shape
        rows = attended.reshape(-1, shape[-1])
        if next_norm is None or not (self.fused_all_reduce and self.fused_router
                                     and push_fuses(self.group, rows, moe.gate.weight)):
            h, moe_input, routing = self.residual_norm_route(x, all_reduce(attended, self.group, 0))
            return h + all_reduce(moe(moe_input, routing=routing), self.group, 1), None
        group_name = (self.group or dist.group.WORLD).group_name
        h, moe_input, weights, ids = push_residual_norm_route(
            rows, x.reshape(-1, shape[-1]), self.ffn_norm.weight, self.ffn_norm.eps, moe.gate.weight, moe.top_k,
            group_name)
        partials = moe.expert_partials(moe_input, (weights, ids)) if self.fold_expert_sum else None
        if partials is not None:
            out, normed = push_residual_norm_partials(partials, moe.top_k, h, next_norm.weight, next_norm.eps,
                                                      group_name)
        else:
            experts = moe(moe_input.view(shape), routing=(weights, ids)).reshape(-1, shape[-1])
            out, normed = push_residual_norm(experts, h, next_norm.weight, next_norm.eps, group_name)
        return out.view(shape), normed.view(shape)


class _Sharder:
    """Replaces weights by this rank's slice of them."""

    def __init__(self, rank: int, world_size: int, device: torch.device | str | None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def slice(self, tensor: Tensor, dim: int) -> Tensor:
        size = tensor.shape[dim] // self.world_size
        part = tensor.detach().narrow(dim, self.rank * size, size)
        # A copy, contiguous (the fused kernels assume it): a view would keep the whole tensor alive.
        return part.to(device=self.device or part.device, memory_format=torch.contiguous_format, copy=True)

    def fused_rows(self, tensor: Tensor, sizes: list[int]) -> Tensor:
        """This rank's rows of each of the blocks [sizes[0] rows; sizes[1] rows; ...] stacked in dim 0."""
        return torch.cat([self.slice(block, 0) for block in tensor.split(sizes, dim=0)], dim=0)

    def attention(self, attention: Attention) -> None:
        head_dim = attention.head_dim
        q_rows, kv_rows = attention.n_heads * head_dim, attention.n_kv_heads * head_dim
        # wqkv is column parallel: q, k and v rows are split separately, so that a rank's query heads
        # sit with the key-value heads their group attends to. Int8 scales are per output row: split too.
        wqkv = attention.wqkv
        for name in ("weight", "scales"):
            if hasattr(wqkv, name):
                _replace(wqkv, name, self.fused_rows(getattr(wqkv, name), [q_rows, kv_rows, kv_rows]))
        wqkv.out_features = wqkv.weight.shape[0]
        # wo is row parallel: its input columns are split; its per-output-row scales stay whole.
        _replace(attention.wo, "weight", self.slice(attention.wo.weight, 1))
        attention.wo.in_features = attention.wo.weight.shape[1]
        attention.n_heads //= self.world_size
        attention.n_kv_heads //= self.world_size

    def experts_by_intermediate(self, experts: ConditionalFeedForward) -> None:
        # w1, w3 [E, I, D] and their scales [E, I] by rows of I; w2 [E, D, I] by columns, scales [E, D] whole.
        for name in ("w1", "w3", "w1_scales", "w3_scales"):
            if hasattr(experts, name):
                _replace(experts, name, self.slice(getattr(experts, name), 1))
        _replace(experts, "w2", self.slice(experts.w2, 2))

    def experts_whole(self, experts: ConditionalFeedForward) -> ExpertParallelExperts:
        for name in ("w1", "w2", "w3", "w1_scales", "w2_scales", "w3_scales"):
            if hasattr(experts, name):
                _replace(experts, name, self.slice(getattr(experts, name), 0))
        return ExpertParallelExperts(experts, first_expert=self.rank * experts.w1.shape[0])


def _replace(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Swap a parameter or buffer for `tensor`, keeping its kind (parameter or buffer)."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor
