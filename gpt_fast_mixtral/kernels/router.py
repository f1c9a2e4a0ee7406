"""Residual add, RMSNorm and MoE routing of one transformer block in one kernel.

Between the attention block and the experts, a decode step otherwise runs four small kernels (residual +
norm, router matmul, softmax + top-k, renormalise), each a few microseconds of launch and latency for a
few kilobytes of data. `residual_norm_route` does all of it with one program per token row:

    h = x + delta                                   (the residual stream, x's dtype)
    normed = RMSNorm(h) * norm_weight                (rounded as model.RMSNorm rounds)
    probs = softmax(normed @ gate_weight.T)          (logits rounded to x's dtype, softmax in float32)
    weights, ids = top_k(probs, k); weights /= sum   (renormalised, x's dtype)

`reference_residual_norm_route` is the same in plain PyTorch (the model's own functions), which the GPU
tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt_fast_mixtral.kernels import pdl

try:
    import triton
    import triton.language as tl

    from gpt_fast_mixtral.kernels.pdl import pdl_release, pdl_wait
except ImportError:  # CPU-only installs: the model keeps its PyTorch path
    triton = None


# Router weight elements up to which one program holds the whole [E, D] tile in registers (16 warps:
# 128 per thread at the limit).
SINGLE_PASS_ELEMENTS = 1 << 16
# Bytes of router weights a thread holds in the single pass, which takes as few warps as that allows (at
# most 16): every warp runs the block reductions' last steps, the softmax and the top-k after the wait, so
# warps beyond what the weights need add issue slots to the latency between wo and the experts. Mixtral's
# [8, 4096] bfloat16 takes 8 warps (124 registers a thread). H200, int8 Mixtral-8x7B batch 1, alternating
# processes of one call (session 40, benchmarks/results/h200_s40_router_attention.log): 281.8 / 282.0 tok/s
# with 8 warps, 281.3 / 281.7 with 4 (512 bytes, 253 registers), 280.7 / 280.9 with 16 (128 bytes).
SINGLE_PASS_THREAD_BYTES = 256


def available(x: Tensor) -> bool:
    return triton is not None and x.is_cuda


def _tile(dim: int, num_experts: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_D) holding router weights [E, D] whole: each rounded up to a power of two (E to 2 at
    least)."""
    return max(2, triton.next_power_of_2(num_experts)), triton.next_power_of_2(dim)


def single_pass(dim: int, num_experts: int) -> bool:
    """Whether one program holds a whole row and all the router weights [E, D] at once."""
    block_e, block_d = _tile(dim, num_experts)
    return block_e * block_d <= SINGLE_PASS_ELEMENTS


def single_pass_warps(dim: int, num_experts: int, element_size: int) -> int:
    """Warps of the single pass over router weights [E, D] of element_size bytes (SINGLE_PASS_THREAD_BYTES a
    thread, 1 to 16 warps)."""
    block_e, block_d = _tile(dim, num_experts)
    return max(1, min(16, block_e * block_d * element_size // (32 * SINGLE_PASS_THREAD_BYTES)))


def reference_residual_norm_route(x: Tensor, delta: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                                  top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h, normed, routing weights [N, k] and expert ids [N, k] for x, delta [N, D]: the model's own
    functions, as TransformerBlock runs them without the kernel."""
    from gpt_fast_mixtral.model import rms_norm, route

    h = x + delta
    normed = rms_norm(h, norm_weight, eps)
    return (h, normed, *route(F.linear(normed, gate_weight), top_k))


if triton is not None:

    @triton.jit
    def _residual(x_ptr, delta_ptr, row, stride_x, stride_delta, offs_d, mask_d):
        """h = x + delta for columns offs_d of one row, in x's dtype."""
        return (tl.load(x_ptr + row * stride_x + offs_d, mask=mask_d, other=0.0)
                + tl.load(delta_ptr + row * stride_delta + offs_d, mask=mask_d, other=0.0))

    @triton.jit
    def rstd_of_squares(squares, dim, eps):
        """1 / sqrt(mean + eps) in float32 from a row's squares (whole, or summed over chunks; masked zero)."""
        return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / dim + eps)

    @triton.jit
    def rms_rstd(h, dim, eps):
        """1 / sqrt(mean(h ** 2) + eps) in float32 of a row held whole (masked columns zero)."""
        return rstd_of_squares(h.to(tl.float32) * h.to(tl.float32), dim, eps)

    @triton.jit
    def normed_row(h, norm_w, rstd):
        """(h * rstd) rounded to the activation dtype, then times the weight, rounded: as model.RMSNorm."""
        return (norm_w.to(tl.float32) * (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)).to(h.dtype)

    @triton.jit
    def _residual_norm_route_kernel(x_ptr, delta_ptr, norm_w_ptr, gate_w_ptr, h_ptr, normed_ptr, weights_ptr,
                                    ids_ptr, dim, num_experts, eps, stride_x, stride_delta, stride_h,
                                    stride_normed, stride_gate,
                                    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                                    BLOCK_E: tl.constexpr, SINGLE_PASS: tl.constexpr, PDL: tl.constexpr = False):
        """One token row per program. SINGLE_PASS (BLOCK_D covers the row): everything from one load of
        the row and the router weights. Otherwise in BLOCK_D chunks: pass 1 writes h and sums its squares,
        pass 2 writes the normed row and accumulates the router logits of every expert. PDL: launched with
        programmatic dependent launch (kernels.pdl); the single pass loads the weights before its wait."""
        pdl_release(PDL)
        if not SINGLE_PASS:
            pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        if SINGLE_PASS:
            # The whole row in one block: every load is issued at once (a decode step's router is latency,
            # not bandwidth: two serial passes of dependent loads cost ~19 us on an H200).
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < dim
            gate_w = tl.load(gate_w_ptr + offs_e[:, None] * stride_gate + offs_d[None, :],
                             mask=mask_e[:, None] & mask_d[None, :], other=0.0)
            norm_w = tl.load(norm_w_ptr + offs_d, mask=mask_d, other=0.0)
            pdl_wait(PDL)
            h = _residual(x_ptr, delta_ptr, row, stride_x, stride_delta, offs_d, mask_d)
            tl.store(h_ptr + row * stride_h + offs_d, h, mask=mask_d)
            rstd = rms_rstd(h, dim, eps)
            normed = normed_row(h, norm_w, rstd)
            tl.store(normed_ptr + row * stride_normed + offs_d, normed, mask=mask_d)
            logits = tl.sum(gate_w.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1)
        else:
            sum_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < dim
                h = _residual(x_ptr, delta_ptr, row, stride_x, stride_delta, offs_d, mask_d)
                tl.store(h_ptr + row * stride_h + offs_d, h, mask=mask_d)
                sum_sq += h.to(tl.float32) * h.to(tl.float32)
            rstd = rstd_of_squares(sum_sq, dim, eps)
            logits = tl.zeros((BLOCK_E,), dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < dim
                # h again from x and delta (this program's own stores to h need not be visible to its threads)
                h = _residual(x_ptr, delta_ptr, row, stride_x, stride_delta, offs_d, mask_d)
                norm_w = tl.load(norm_w_ptr + offs_d, mask=mask_d, other=0.0)
                normed = normed_row(h, norm_w, rstd)
                tl.store(normed_ptr + row * stride_normed + offs_d, normed, mask=mask_d)
                gate_w = tl.load(gate_w_ptr + offs_e[:, None] * stride_gate + offs_d[None, :],
                                 mask=mask_e[:, None] & mask_d[None, :], other=0.0)
                logits += tl.sum(gate_w.to(tl.float32) * normed.to(tl.float32)[None, :], axis=1)
        store_routing(logits.to(x_ptr.dtype.element_ty), row, num_experts, weights_ptr, ids_ptr, TOP_K, BLOCK_K,
                      BLOCK_E)

    @triton.jit
    def store_routing(logits, row, num_experts, weights_ptr, ids_ptr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_E: tl.constexpr):
        """Softmax in float32 of one row's router logits (BLOCK_E of them, in the activation dtype as
        F.linear returns them), top-k, renormalised: weights (weights_ptr's dtype) and ids (int64) of `row`."""
        offs_e = tl.arange(0, BLOCK_E)
        mask_e = offs_e < num_experts
        logits = tl.where(mask_e, logits.to(tl.float32), float("-inf"))
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = tl.where(mask_e, probs / tl.sum(probs, axis=0), -1.0)
        # Top-k by k max-reductions; ties go to the lowest expert id.
        offs_k = tl.arange(0, BLOCK_K)
        chosen = tl.zeros((BLOCK_K,), dtype=tl.float32)
        chosen_ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            best = tl.max(probs, axis=0)
            best_id = tl.min(tl.where(probs == best, offs_e, BLOCK_E), axis=0)
            chosen = tl.where(offs_k == k, best, chosen)
            chosen_ids = tl.where(offs_k == k, best_id, chosen_ids)
            probs = tl.where(offs_e == best_id, -1.0, probs)
        mask_k = offs_k < TOP_K
        weights = chosen / tl.sum(chosen, axis=0)
        tl.store(weights_ptr + row * TOP_K + offs_k, weights.to(weights_ptr.dtype.element_ty), mask=mask_k)
        tl.store(ids_ptr + row * TOP_K + offs_k, chosen_ids.to(tl.int64), mask=mask_k)


def residual_norm_route(x: Tensor, delta: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                        top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused kernel: what reference_residual_norm_route returns, for x, delta [N, D] on a GPU."""
    if pdl.compiled_launch(x):
        return torch.ops.gpt_fast_mixtral.residual_norm_route(x, delta, norm_weight, eps, gate_weight, top_k)
    return _residual_norm_route(x, delta, norm_weight, eps, gate_weight, top_k)


def _outputs(x: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h, normed, the routing weights (summed and divided in float32, stored rounded to x's dtype like the
    reference: a separate cast was one more kernel per layer in a decode step) and the expert ids."""
    num_rows = x.shape[0]
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(num_rows, top_k),
            torch.empty(num_rows, top_k, dtype=torch.int64, device=x.device))


def _residual_norm_route(x: Tensor, delta: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                         top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    num_rows, dim = x.shape
    num_experts = gate_weight.shape[0]
    h, normed, weights, ids = _outputs(x, top_k)
    if num_rows:
        # One pass over the row while the router weights fit in registers (Mixtral: 8 x 4096), else chunks.
        block_e, block_d = _tile(dim, num_experts)
        single = single_pass(dim, num_experts)
        if not single:
            block_d = min(1024, block_d)
        use_pdl = pdl.active(x)
        _residual_norm_route_kernel[(num_rows,)](
            x, delta, norm_weight, gate_weight, h, normed, weights, ids, dim, num_experts, eps,
            x.stride(0), delta.stride(0), h.stride(0), normed.stride(0), gate_weight.stride(0),
            TOP_K=top_k, BLOCK_K=max(2, triton.next_power_of_2(top_k)),
            BLOCK_D=block_d, BLOCK_E=block_e, SINGLE_PASS=single, PDL=use_pdl,
            num_warps=single_pass_warps(dim, num_experts, gate_weight.element_size()) if single else 4,
            **pdl.launch_options(use_pdl))
    return h, normed, weights, ids


@torch.library.custom_op("gpt_fast_mixtral::residual_norm_route", mutates_args=())
def _residual_norm_route_op(x: Tensor, delta: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
                            top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _residual_norm_route(x, delta, norm_weight, eps, gate_weight, top_k)


@_residual_norm_route_op.register_fake
def _(x: Tensor, delta: Tensor, norm_weight: Tensor, eps: float, gate_weight: Tensor,
      top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _outputs(x, top_k)
