"""Mixtral-shaped Mixture-of-Experts transformer in plain PyTorch.

Every row of a batch carries its own positions (`input_pos`, shape [B, T]), so prompts of different
lengths share one batch: a row is right-padded during prefill and the padding's cache entries are
overwritten by that row's later tokens before any query of the row can see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt_fast_mixtral.config import ModelArgs
from gpt_fast_mixtral.kernels import attention as attention_kernels
from gpt_fast_mixtral.kernels import linear as linear_kernels
from gpt_fast_mixtral.kernels import moe as fused_moe_kernels
from gpt_fast_mixtral.kernels import router as router_kernels


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The decode attention kernel's per-(row, kv head) counters: zero between calls.
        self.register_buffer("counters", torch.zeros(max_batch_size, n_kv_heads, dtype=torch.int32, device=device),
                             persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v ([B, H, T, D]) at each row's positions; return the cache rows [B, H, S, D]."""
        batch = k.shape[0]
        # index_put_ on the whole buffer writes B*T rows in place; a scatter_ into a batch slice made
        # Inductor copy the entire cache on every step.
        rows = torch.arange(batch, device=input_pos.device)[:, None]
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2)
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache[:batch], self.v_cache[:batch]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension, normalised in float32 whatever the activation dtype (as the
    reference implementation does), rounded to x's dtype, then scaled by weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class FusedOnGpu:
    """`fn` compiled (dynamic shapes, compiled once) when called eagerly on a GPU; else `fn`.

    Prefill runs eagerly, where the float32 chain of rms_norm is 7-10 kernels over the whole [T, D]
    activations (~40 ms of eager elementwise work in a 2048-token int8 prefill on an H200, with rope's);
    inside the compiled decode step the step's own compile fuses them, so `fn` is traced there.
    `enabled` (class-wide) switches these and prefill's rope kernel (Attention) off for comparisons
    (scripts/benchmark.py --eager-prefill-ops).
    """

    enabled = True

    def __init__(self, fn) -> None:
        self.fn = fn
        self.compiled = None  # made at the first GPU call: CPU-only users never import the compiler

    def __call__(self, x: Tensor, *args):
        if self.enabled and x.is_cuda and not torch.compiler.is_compiling():
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(x, *args)
        return self.fn(x, *args)


fused_rms_norm = FusedOnGpu(rms_norm)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return fused_rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose one-token products on a GPU (x of one row, weight of x's dtype) run
    kernels/linear.py's matrix-vector kernel, which launches with PDL in the decode step's chain of
    kernels; every other call is F.linear (cuBLAS). The state dict is nn.Linear's."""

    # False: F.linear always (scripts/benchmark.py --no-decode-linear compares)
    decode_kernel = True

    def forward(self, x: Tensor) -> Tensor:
        if (self.decode_kernel and self.bias is None and x.numel() == x.shape[-1] and self.weight.dtype == x.dtype
                and linear_kernels.available(x) and self.weight.is_contiguous()):
            return linear_kernels.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def rope_tables(args: ModelArgs, max_seq_len: int, device: torch.device | None = None) -> Tensor:
    """cos and sin of every position, [max_seq_len, head_dim // 2, 2], float32."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=device) / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    freqs = torch.arange(max_seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x ([B, T, H, D]) in the half-split layout (first half pairs with second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


fused_apply_rope = FusedOnGpu(apply_rope)


class Attention(nn.Module):
    # One-token steps on a GPU use kernels/attention.py (False: SDPA with a mask, as prefill does) ...
    decode_kernel = True
    # ... and, with decode_kernel, rotate q and k, write the KV cache and attend in one kernel
    # (rope_cache_attention; False: the rotations and cache writes are compiled PyTorch, then the kernel).
    fused_rope_cache = True

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.wqkv = Linear(args.dim, args.qkv_out_features, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None
        # The model's rotary tables [max_seq_len, head_dim / 2, 2] (set with the cache): the fused decode
        # kernel reads each row's position in them itself (see rope_cache_attention).
        self.rope_table: Tensor | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, kv_len: int | None) -> Tensor:
        batch, seq_len, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        assert self.kv_cache is not None, "call Transformer.setup_caches() before running the model"
        decode_kernel = seq_len == 1 and self.decode_kernel and attention_kernels.available(x)
        if decode_kernel and self.fused_rope_cache and self.rope_table is not None:
            cache, table = self.kv_cache, self.rope_table
            out = attention_kernels.rope_cache_attention(
                self.wqkv(x).view(batch, -1), table[..., 0], table[..., 1], cache.k_cache, cache.v_cache,
                input_pos[:, 0], self.n_heads, self.n_kv_heads, self.head_dim, self.sliding_window, cache.counters,
                release_after_first_tile=getattr(self.wo, "preloads_weight", False))
            return self.wo(out.view(batch, 1, q_size))
        qkv = self.wqkv(x)
        v = qkv[..., q_size + kv_size:].view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if seq_len > 1 and FusedOnGpu.enabled and attention_kernels.available(x) \
                and not torch.compiler.is_compiling():
            # prefill: q and k rotated by one kernel
            rotated = attention_kernels.rope_rows(qkv.reshape(batch * seq_len, -1),
                                                  cos.reshape(batch * seq_len, -1), sin.reshape(batch * seq_len, -1),
                                                  self.n_heads, self.n_kv_heads, self.head_dim)
            q = rotated[:, :q_size].view(batch, seq_len, self.n_heads, self.head_dim)
            k = rotated[:, q_size:].view(batch, seq_len, self.n_kv_heads, self.head_dim)
        else:
            q = fused_apply_rope(qkv[..., :q_size].view(batch, seq_len, self.n_heads, self.head_dim), cos, sin)
            k = fused_apply_rope(qkv[..., q_size:q_size + kv_size].view(batch, seq_len, self.n_kv_heads,
                                                                        self.head_dim), cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))

        keys, values = self.kv_cache.update(input_pos, k, v)
        if decode_kernel:
            # Reads each row's filled slots only (the SDPA below reads all max_seq_len of them).
            out = attention_kernels.decode_attention(q[:, :, 0], keys, values, input_pos[:, 0] + 1,
                                                     self.sliding_window, self.kv_cache.counters)
            return self.wo(out.view(batch, 1, q_size))
        if kv_len is not None:
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        gqa = self.n_heads != self.n_kv_heads
        if kv_len == seq_len and (self.sliding_window is None or seq_len <= self.sliding_window):
            # A prompt's first chunk (positions 0..T-1 in every row, the contract of kv_len == T): plain
            # causal attention, which SDPA runs as flash attention; a mask would rule that kernel out.
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            mask = self._mask(input_pos, keys.shape[2])
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, q_size))

    def _mask(self, input_pos: Tensor, kv_len: int) -> Tensor:
        """[B, 1, T, S] True where a query may attend: causal per row, within the sliding window."""
        key_pos = torch.arange(kv_len, device=input_pos.device)
        query_pos = input_pos[:, None, :, None]
        allowed = key_pos <= query_pos
        if self.sliding_window is not None:
            allowed = allowed & (query_pos - key_pos < self.sliding_window)
        return allowed


class ConditionalFeedForward(nn.Module):
    """The experts of one layer, stacked: w1 (gate) and w3 (up) are [E, I, D], w2 (down) is [E, D, I].

    On CUDA, decode-sized inputs go through the fused Triton kernels (kernels/moe.py). The PyTorch
    paths, chosen from static shapes so that a compiled decode step never syncs: few tokens gather
    only their experts' weights; a decode batch that touches most experts runs every expert densely
    (each weight read once); long inputs (prefill) group tokens by expert.
    """

    dense_max_tokens = 64
    # Up to this many tokens the fused kernels serve bf16 (grouped GEMMs from kernels.moe's
    # grouped_min_slots on); longer prompts group tokens per expert in PyTorch (cuBLAS): on an H200 bf16
    # 2048 tokens 119 ms to first token that way. The grouped kernels alone take 3.26 ms per layer at 2048
    # tokens; whether they beat cuBLAS end to end in bf16 is not yet measured.
    fused_max_tokens = 512
    # (rows, columns): w1 and w3 are stored in blocks (kernels.moe.block_rows) for the fused kernels;
    # None: row-major. Only `block_w13` sets it (on the instance); checkpoints are always row-major.
    w13_block: tuple[int, int] | None = None

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        experts, inter, dim = args.num_experts, args.intermediate_size, args.dim
        self.w1 = nn.Parameter(torch.empty(experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, inter))
        self.w3 = nn.Parameter(torch.empty(experts, inter, dim))

    def block_w13(self, block: tuple[int, int]) -> None:
        """Store w1 and w3 in `block` blocks, in place (see kernels.moe.block_rows)."""
        if self.w13_block is not None:
            raise RuntimeError(f"w1 and w3 are already stored in {self.w13_block} blocks")
        with torch.no_grad():
            for name in ("w1", "w3"):
                weight = getattr(self, name)
                weight.copy_(fused_moe_kernels.block_rows(weight, block))
        self.w13_block = block

    def fused_scales(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Per-output-channel scales of w1, w2, w3 for the fused kernel (None: weights are not quantized)."""
        return None

    def stored_weight(self, name: str, index: Tensor | int | slice) -> Tensor:
        """getattr(self, name)[index], row-major whatever the storage."""
        weight = getattr(self, name)[index]
        if self.w13_block is not None and name in ("w1", "w3"):
            weight = fused_moe_kernels.unblock_rows(weight, self.w13_block)
        return weight

    def expert_weight(self, name: str, index: Tensor | int | slice, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor | None]:
        """Weights of the selected experts in `dtype`, and per-output-channel scales if quantized."""
        return self.stored_weight(name, index), None

    def forward(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor:
        """sum_k expert_weights[n, k] * expert_{expert_indices[n, k]}(x[n]); an id < 0 is no expert (its
        weight must be 0): expert parallelism marks the slots of other ranks' experts so."""
        num_tokens, top_k = expert_indices.shape
        num_experts = self.w1.shape[0]
        if num_tokens <= self.fused_max_tokens and fused_moe_kernels.available(x):
            return fused_moe_kernels.fused_moe(x, self.w1, self.w2, self.w3, expert_weights, expert_indices,
                                               self.fused_scales(), w13_block=self.w13_block)
        expert_indices = expert_indices.clamp(min=0)  # a slot of no expert: expert 0 at weight 0
        if num_tokens * top_k < num_experts:
            return self._gathered(x, expert_weights, expert_indices)
        if num_tokens <= self.dense_max_tokens:
            return self._dense(x, expert_weights, expert_indices)
        return self._grouped(x, expert_weights, expert_indices)

    def end_block(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor, residual: Tensor, norm: RMSNorm
                  ) -> tuple[Tensor, Tensor] | None:
        """(residual + self(x, ...), norm(that)) from the fused decode kernels, which end the block with a
        kernel of their own where they launch with PDL (kernels.moe.ends_block); None elsewhere (the
        caller adds and normalises)."""
        if not (fused_moe_kernels.available(x) and fused_moe_kernels.ends_block(x, expert_indices.numel())):
            return None
        end = fused_moe_kernels.BlockEnd(residual, norm.weight, norm.eps)
        return fused_moe_kernels.fused_moe(x, self.w1, self.w2, self.w3, expert_weights, expert_indices,
                                           self.fused_scales(), w13_block=self.w13_block, end=end)

    def expert_partials(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor | None:
        """self(x, ...) before its last sum, from the fused decode kernels: their float32 partials [split,
        N * k, D] (kernels.moe.fused_moe_partials), for a consumer that sums them in kernels.moe.block_end's
        order (tp's push all-reduce); None where those kernels do not run with PDL."""
        if not (fused_moe_kernels.available(x) and fused_moe_kernels.ends_block(x, expert_indices.numel())):
            return None
        return fused_moe_kernels.fused_moe_partials(x, self.w1, self.w2, self.w3, expert_weights, expert_indices,
                                                    self.fused_scales(), w13_block=self.w13_block)

    def _project(self, x: Tensor, name: str, index: Tensor | int | slice, equation: str) -> Tensor:
        weight, scale = self.expert_weight(name, index, x.dtype)
        out = torch.einsum(equation, x, weight)
        return out if scale is None else out * scale

    def _gathered(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor:
        gate = self._project(x, "w1", expert_indices, "nd,nkid->nki")
        up = self._project(x, "w3", expert_indices, "nd,nkid->nki")
        down = self._project(F.silu(gate) * up, "w2", expert_indices, "nki,nkdi->nkd")
        return torch.einsum("nkd,nk->nd", down, expert_weights)

    def _dense(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor:
        everything = slice(None)
        gate = self._project(x, "w1", everything, "nd,eid->nei")
        up = self._project(x, "w3", everything, "nd,eid->nei")
        down = self._project(F.silu(gate) * up, "w2", everything, "nei,edi->ned")
        routing = torch.zeros(x.shape[0], down.shape[1], dtype=down.dtype, device=x.device)
        # Added, not written: under expert parallelism several zero-weighted slots of a token may name the
        # same local expert as a real slot, and a plain scatter_ could keep a zero over the real weight.
        routing.scatter_add_(1, expert_indices, expert_weights)
        return torch.einsum("ned,ne->nd", down, routing)

    def _grouped(self, x: Tensor, expert_weights: Tensor, expert_indices: Tensor) -> Tensor:
        top_k, num_experts = expert_indices.shape[1], self.w1.shape[0]
        flat_weights = expert_weights.flatten()
        # A slot of weight 0 adds nothing (expert parallelism zeroes the slots of other ranks' experts):
        # parked past the last expert, it sorts last and no expert runs it.
        flat_experts = expert_indices.flatten().masked_fill(flat_weights == 0, num_experts)
        order = flat_experts.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_experts, minlength=num_experts)[:num_experts].tolist()  # one sync per layer
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            tokens = x[rows]
            gate = self._project(tokens, "w1", expert, "nd,id->ni")
            up = self._project(tokens, "w3", expert, "nd,id->ni")
            down = self._project(F.silu(gate) * up, "w2", expert, "ni,di->nd")
            weights = flat_weights[order[start:start + count]]
            out.index_add_(0, rows, down * weights[:, None])
            start += count
        return out


def top_k(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(probs, k) over the last dimension (largest first) for probabilities (>= 0), as k
    max-reductions: a compiled decode step fuses them with the softmax, where topk costs a top-k and a
    sort kernel per layer (8 us of a ~165 us layer on an H200)."""
    columns = torch.arange(probs.shape[-1], device=probs.device)
    values, indices = [], []
    for _ in range(k):
        value, index = probs.max(dim=-1)
        values.append(value)
        indices.append(index)
        probs = torch.where(columns == index[..., None], -1.0, probs)  # below every probability
    return torch.stack(values, dim=-1), torch.stack(indices, dim=-1)


def route(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Router logits [N, E] to routing weights [N, k] (logits' dtype) and expert ids: softmax in float32,
    top-k, renormalise."""
    weights, indices = top_k(F.softmax(logits.float(), dim=-1), k)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), indices


class MOEFeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.cond_ffn = ConditionalFeedForward(args)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return route(self.gate(x), self.top_k)

    def forward(self, x: Tensor, routing: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The experts' sum for x [..., D]; `routing` (weights, ids [N, k]) when already computed."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.route(x) if routing is None else routing
        return self.cond_ffn(x, weights, indices).reshape(shape)

    def expert_partials(self, x: Tensor, routing: tuple[Tensor, Tensor]) -> Tensor | None:
        """ConditionalFeedForward.expert_partials for x [..., D] (None: not fused here, or experts of another
        kind)."""
        partials = getattr(self.cond_ffn, "expert_partials", None)
        return None if partials is None else partials(x.reshape(-1, x.shape[-1]), *routing)

    def end_block(self, x: Tensor, routing: tuple[Tensor, Tensor], residual: Tensor, norm: RMSNorm
                  ) -> tuple[Tensor, Tensor] | None:
        """ConditionalFeedForward.end_block for x [..., D] (None: not fused here, or experts of another kind)."""
        end_block = getattr(self.cond_ffn, "end_block", None)
        if end_block is None:
            return None
        shape = x.shape
        ended = end_block(x.reshape(-1, shape[-1]), *routing, residual.reshape(-1, shape[-1]), norm)
        return None if ended is None else (ended[0].view(shape), ended[1].view(shape))


class TransformerBlock(nn.Module):
    # On a GPU: the residual add, ffn_norm and the routing in one kernel (kernels/router.py) instead of
    # four small ones. H200, int8 Mixtral-8x7B batch 1: 205.8 tok/s, 201.4 without
    # (scripts/benchmark.py --no-fused-router).
    fused_router = True

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.block_sparse_moe = MOEFeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, kv_len: int | None,
                normed: Tensor | None = None, next_norm: RMSNorm | None = None) -> tuple[Tensor, Tensor | None]:
        """The block's output for x [B, T, D], and next_norm(output) where the block computed it on the way
        (the fused decode kernels' block end, ConditionalFeedForward.end_block; tp.TensorParallelBlock's last
        all-reduce), else None. `normed`: attention_norm(x),
        when the block before computed it."""
        attended = self.attention(self.attention_norm(x) if normed is None else normed, cos, sin, input_pos, kv_len)
        h, moe_input, routing = self.residual_norm_route(x, attended)
        if next_norm is not None and routing is not None:
            ended = self.block_sparse_moe.end_block(moe_input, routing, h, next_norm)
            if ended is not None:
                return ended
        return h + self.block_sparse_moe(moe_input, routing=routing), None

    def residual_norm_route(self, x: Tensor, attended: Tensor
                            ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """h = x + attended, ffn_norm(h) and, from the fused kernel, its routing (None: the MoE block routes)."""
        if self.fused_router and router_kernels.available(x):
            moe, shape = self.block_sparse_moe, x.shape
            h, normed, weights, ids = router_kernels.residual_norm_route(
                x.reshape(-1, shape[-1]).contiguous(), attended.reshape(-1, shape[-1]).contiguous(),
                self.ffn_norm.weight, self.ffn_norm.eps, moe.gate.weight, moe.top_k)
            return h.view(shape), normed.view(shape), (weights, ids)
        h = x + attended
        return h, self.ffn_norm(h), None


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.register_buffer("rope", None, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache; the context is capped at the model's position limit."""
        if max_seq_len > self.args.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                f"{self.args.max_position_embeddings}")
        if (max_batch_size, max_seq_len) == (self.max_batch_size, self.max_seq_len):
            return
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:  # a tensor-parallel rank holds only its share of the kv heads
            attention = layer.attention
            attention.kv_cache = KVCache(max_batch_size, max_seq_len, attention.n_kv_heads,
                                         attention.head_dim, self.dtype, self.device)
        self.rope = rope_tables(self.args, max_seq_len, self.device)
        self._share_rope()

    def _share_rope(self) -> None:
        for layer in self.layers:
            layer.attention.rope_table = self.rope

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to() / .cuda() replace the rope buffer: the attention modules' references follow it
        result = super()._apply(fn, recurse)
        self._share_rope()
        return result

    def forward(self, tokens: Tensor, input_pos: Tensor, kv_len: int | None = None,
                logits_index: Tensor | None = None) -> Tensor:
        """Logits for tokens [B, T] at positions input_pos [B, T].

        kv_len limits attention to the first kv_len cache slots (all slots when None, which a
        CUDA-graph decode step needs); kv_len == T declares the first chunk of the prompts (positions
        0..T-1 in every row), which attends with plain causal attention. logits_index [B] keeps only
        one position per row.
        """
        rope = self.rope[input_pos]
        cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
        x = self.tok_embeddings(tokens)
        normed = None  # the next norm's output, where a block computed it (see TransformerBlock.forward)
        for index, layer in enumerate(self.layers):
            next_norm = self.layers[index + 1].attention_norm if index + 1 < len(self.layers) else self.norm
            x, normed = layer(x, cos, sin, input_pos, kv_len, normed, next_norm)
        if logits_index is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x = x[rows, logits_index][:, None]
            normed = None if normed is None else normed[rows, logits_index][:, None]
        return self.output(self.norm(x) if normed is None else normed)
