"""Int8 weight-only quantization, as a transform that swaps modules of the plain model.

Weights are symmetric int8 with one scale per output channel (per expert and channel for the experts),
scales in bf16. The router gate, the norms and the embedding stay in high precision: routing decisions
are discrete, and an error there changes which experts run, not just the output's last bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt_fast_mixtral.checkpoint import (
    CheckpointError,
    is_int8_state_dict,
    meta_model,
    model_layout,
    prepare_output,
    read_state_dict,
    write_streaming,
)
from gpt_fast_mixtral.config import load_model_args
from gpt_fast_mixtral.kernels import linear as linear_kernels
from gpt_fast_mixtral.model import Attention, ConditionalFeedForward, MOEFeedForward, Transformer

SCALE_DTYPE = torch.bfloat16


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 over the last (input) dimension: returns int8 weight and scales [..., out]."""
    weight32 = weight.float()
    scales = weight32.abs().amax(dim=-1).clamp(min=1e-10) / 127.0
    scales = scales.to(SCALE_DTYPE)
    # Quantize with the rounded bf16 scales so that dequantisation uses exactly the stored numbers.
    quantized = torch.round(weight32 / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return quantized, scales


class WeightOnlyInt8Linear(nn.Module):
    # Decode-sized inputs on a GPU take the Triton kernel (weights read once, dequantised in registers);
    # prefill dequantises the weight and uses cuBLAS.
    kernel_config = linear_kernels.DEFAULT_CONFIG
    # One token through a projection marked `preload` (quantize_int8 marks the attention's wo, which
    # follows the nearly idle decode attention) takes this config: linear_kernels.PRELOAD_CONFIG's kernel
    # loads the whole weight before its PDL wait. None: kernel_config for every projection
    # (scripts/benchmark.py --no-wo-preload).
    preload_config: linear_kernels.LinearConfig | None = linear_kernels.PRELOAD_CONFIG

    def __init__(self, in_features: int, out_features: int, device: torch.device | None = None,
                 preload: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.preload = preload
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))

    @property
    def preloads_weight(self) -> bool:
        """Whether one token takes preload_config (model.Attention then has the decode attention kernel let
        this kernel's programs in only once its first keys have arrived: kernels.attention.rope_cache_attention)."""
        return self.preload and self.preload_config is not None

    def forward(self, x: Tensor) -> Tensor:
        if linear_kernels.available(x) and self.weight.is_contiguous():
            if x.numel() <= x.shape[-1] * self.kernel_config.max_tokens:
                one_token = x.numel() == x.shape[-1]
                config = self.preload_config if one_token and self.preloads_weight else self.kernel_config
                return linear_kernels.int8_linear(x, self.weight, self.scales, config)
            # Prefill: the weight times its scales in x's dtype by one kernel, then cuBLAS. (PyTorch's
            # casting copy and broadcasting multiply of the output took 58 + 27 us for wqkv at 2048 tokens
            # on an H200; torch.compile's fusion of the two into a Triton matmul was 30x slower still.)
            return F.linear(x, linear_kernels.dequantize(self.weight, self.scales, x.dtype))
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class ConditionalFeedForwardInt8(ConditionalFeedForward):
    # int8 prompts of every length take the fused kernels (grouped GEMMs from kernels.moe's
    # grouped_min_slots on): no dequantised expert weights. On an H200, 2048 tokens 148 ms to first token
    # (session 5); grouping tokens per expert in PyTorch (dequantising each expert) took 266 ms.
    fused_max_tokens = 1 << 62

    def __init__(self, experts: int, inter: int, dim: int, device: torch.device | None = None) -> None:
        nn.Module.__init__(self)
        shapes = {"w1": (experts, inter, dim), "w2": (experts, dim, inter), "w3": (experts, inter, dim)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scales", torch.empty(shape[:2], dtype=SCALE_DTYPE, device=device))

    def fused_scales(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.w1_scales, self.w2_scales, self.w3_scales

    def expert_weight(self, name: str, index: Tensor | int | slice, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor | None]:
        return self.stored_weight(name, index).to(dtype), getattr(self, f"{name}_scales")[index].to(dtype)


# Block of w1 / w3 that int8 experts use on a GPU (kernels.moe.block_rows): one 8 x 512 tile of the decode
# kernel. H200, Mixtral-8x7B int8 batch 1: 209.9 tok/s against 202.1 row-major in the same session, time
# to first token for 2048 tokens unchanged (145.7 / 145.6 ms; benchmarks/results/h200_int8_b1_session6_*).
# None: row-major (scripts/benchmark.py --no-int8-w13-blocks, for comparisons).
INT8_W13_BLOCK: tuple[int, int] | None = (8, 512)


def block_int8_experts(model: nn.Module, block: tuple[int, int] | None = None) -> int:
    """Store the int8 experts' w1 and w3 of a model on a GPU in `block` blocks (default INT8_W13_BLOCK),
    where their shape divides; returns how many expert modules changed. The fused kernels and expert_weight
    read either storage; a state_dict taken afterwards holds the blocked order, so save checkpoints before."""
    block = block or INT8_W13_BLOCK
    if block is None:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, ConditionalFeedForwardInt8) and module.w13_block is None and module.w1.is_cuda \
                and module.w1.shape[1] % block[0] == 0 and module.w1.shape[2] % block[1] == 0:
            module.block_w13(block)
            changed += 1
    return changed


def quantize_int8(model: Transformer) -> Transformer:
    """Swap every projection but the router gates for its int8 version, in place.

    On a model on the meta device this only changes the layout (for loading an int8 checkpoint);
    on a real model it quantizes the weights.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(module, MOEFeedForward) and child_name == "gate":
                continue
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _int8_linear(child, preload=isinstance(module, Attention)
                                                          and child_name == "wo"))
            elif isinstance(child, ConditionalFeedForward) and not isinstance(child, ConditionalFeedForwardInt8):
                setattr(module, child_name, _int8_experts(child))
    return model


def _int8_linear(linear: nn.Linear, preload: bool = False) -> WeightOnlyInt8Linear:
    quantized = WeightOnlyInt8Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                                     preload=preload)
    if linear.weight.device.type != "meta":
        quantized.weight, quantized.scales = quantize_per_channel(linear.weight.detach())
    return quantized


def _int8_experts(experts: ConditionalFeedForward) -> ConditionalFeedForwardInt8:
    num_experts, inter, dim = experts.w1.shape
    quantized = ConditionalFeedForwardInt8(num_experts, inter, dim, device=experts.w1.device)
    if experts.w1.device.type != "meta":
        for name in ("w1", "w2", "w3"):
            weight, scales = quantize_per_channel(getattr(experts, name).detach())
            setattr(quantized, name, weight)
            setattr(quantized, f"{name}_scales", scales)
    return quantized


def _quantize_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a device torch knows ({error}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but there is no CUDA GPU here (or torch was built without "
                         "CUDA): pass --device cpu, or leave --device out to use a GPU when there is one")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {str(device)!r} is not supported; use cpu or cuda")
    return device


def quantize_checkpoint(checkpoint_path: str | Path, mode: str = "int8", output_path: str | Path | None = None,
                        device: str | torch.device | None = None) -> Path:
    """Quantize our `model.pth` to `model_int8.pth`, one tensor at a time (on the GPU when there is one)."""
    if mode != "int8":
        raise ValueError(f"unsupported quantization mode {mode!r}; supported: int8")
    checkpoint_path = Path(checkpoint_path)
    device = _quantize_device(device)
    source = read_state_dict(checkpoint_path)  # memory-mapped; says what is wrong before the config is looked for
    args = load_model_args(checkpoint_path.parent)
    if is_int8_state_dict(source):
        raise CheckpointError(f"{checkpoint_path} is already int8; quantize the bf16 model.pth instead")
    layout = model_layout(quantize_int8(meta_model(args)))
    for name, (shape, dtype) in layout.items():
        if name.endswith("scales"):
            continue
        if name not in source or source[name].shape != shape:
            raise CheckpointError(
                f"{checkpoint_path} does not match its config.json at {name}; convert the checkpoint again")
        if dtype != torch.int8:  # norms, embedding and router gate keep the source's precision
            layout[name] = (shape, source[name].dtype)
    default_name = checkpoint_path.stem + "_int8.pth"
    output_path = prepare_output(Path(output_path) if output_path else checkpoint_path.with_name(default_name),
                                 default_name)

    def produce() -> Iterator[tuple[str, Tensor]]:
        for name, (_, dtype) in layout.items():
            if name.endswith("scales"):
                continue  # written together with its weight
            tensor = source[name]
            if dtype == torch.int8:
                quantized, scales = quantize_per_channel(tensor.to(device))
                yield name, quantized.cpu()
                scale_name = name[: -len("weight")] + "scales" if name.endswith(".weight") else f"{name}_scales"
                yield scale_name, scales.cpu()
            else:
                yield name, tensor

    write_streaming(output_path, layout, produce())
    return output_path
