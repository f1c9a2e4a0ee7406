"""GPU behaviour: the compiled (CUDA graph) decode step computes what eager decode computes."""

from __future__ import annotations

import pytest
import torch

from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
from gpt_fast_mixtral.generate import Engine, SamplingParams
from gpt_fast_mixtral.tiny_model import make_tiny_model
from gpt_fast_mixtral.tokenizer import Tokenizer

pytestmark = pytest.mark.gpu

PROMPTS = ["The capital of France is", "Experts route every token to two of eight", "Hi"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = make_tiny_model(tmp_path_factory.mktemp("gpu_tiny"), seed=3, dtype=torch.float32,
                          num_experts=6, num_experts_per_tok=3)
    return convert_checkpoint(out)


def engines(checkpoint, dtype):
    tokenizer = Tokenizer(checkpoint.parent / "tokenizer.model")
    made = []
    for compile_ in (False, True):
        model = load_model(checkpoint, device="cuda", dtype=dtype)
        made.append(Engine(model, tokenizer, max_batch_size=len(PROMPTS), max_seq_len=256, compile=compile_))
    return made


def test_compiled_decode_gives_eager_tokens_in_float32(checkpoint):
    eager, compiled = engines(checkpoint, torch.float32)
    params = [SamplingParams(max_new_tokens=40)] * len(PROMPTS)
    assert [r.tokens for r in compiled.generate(PROMPTS, params)] == [
        r.tokens for r in eager.generate(PROMPTS, params)]
    # Batch sizes 1 and 2 run through their own CUDA graphs.
    for count in (1, 2):
        assert [r.tokens for r in compiled.generate(PROMPTS[:count], params[:count])] == [
            r.tokens for r in eager.generate(PROMPTS[:count], params[:count])]


def test_compiled_sampling_matches_eager_sampling(checkpoint):
    eager, compiled = engines(checkpoint, torch.float32)
    params = [SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.9, seed=s) for s in (1, 2, 3)]
    assert [r.tokens for r in compiled.generate(PROMPTS, params)] == [
        r.tokens for r in eager.generate(PROMPTS, params)]


def test_compiled_decode_logits_close_to_eager_in_bfloat16(checkpoint):
    eager, compiled = engines(checkpoint, torch.bfloat16)
    tokens = torch.tensor([[1, 50, 60, 70]], device="cuda")
    with torch.inference_mode():
        eager.model(tokens[:, :3], torch.arange(3, device="cuda")[None])
        expected = eager.model(tokens[:, 3:], torch.tensor([[3]], device="cuda")).float()
        step = torch.compile(compiled.model, mode="reduce-overhead", fullgraph=True)
        compiled.model(tokens[:, :3], torch.arange(3, device="cuda")[None])
        got = step(tokens[:, 3:], torch.tensor([[3]], device="cuda")).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def test_int8_logits_close_to_bfloat16_on_gpu(checkpoint, tmp_path):
    from gpt_fast_mixtral.quantize import quantize_checkpoint

    int8_path = quantize_checkpoint(checkpoint, output_path=checkpoint.parent / "model_int8.pth", device="cuda")
    bf16 = load_model(checkpoint, device="cuda", dtype=torch.bfloat16)
    int8 = load_model(int8_path, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(3, bf16.args.vocab_size, (2, 32), device="cuda")
    positions = torch.arange(32, device="cuda").expand(2, 32)
    for model in (bf16, int8):
        model.setup_caches(2, 64)
    with torch.inference_mode():
        expected, got = bf16(tokens, positions).float(), int8(tokens, positions).float()
    # Per-channel int8 weights add ~0.5% noise per projection; a bound of 5% catches a wrong scale.
    assert ((got - expected).norm() / expected.norm()).item() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_norm_and_rope_compiled_match_the_eager_functions(dtype):
    from gpt_fast_mixtral.model import FusedOnGpu, apply_rope, fused_apply_rope, fused_rms_norm, rms_norm

    assert FusedOnGpu.enabled
    generator = torch.Generator(device="cuda").manual_seed(0)
    for rows, dim, heads in ((7, 96, 3), (2048, 4096, 32), (1, 4096, 8)):  # dynamic shapes: one compile
        x = torch.randn(1, rows, dim, device="cuda", generator=generator).to(dtype)
        weight = torch.rand(dim, device="cuda", generator=generator).to(dtype) + 0.5
        got, expected = fused_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5)
        # float32 sums in a different order, then the same roundings: at most one rounding step apart
        assert got.dtype == dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2 if dtype ==
                                                     torch.bfloat16 else 1e-5, atol=1e-5)
        q = x.view(1, rows, heads, dim // heads)
        angles = torch.rand(1, rows, 1, dim // heads // 2, device="cuda", generator=generator) * 6
        got, expected = fused_apply_rope(q, angles.cos(), angles.sin()), apply_rope(q, angles.cos(), angles.sin())
        assert got.dtype == dtype and torch.allclose(got.float(), expected.float(), rtol=1e-2 if dtype ==
                                                     torch.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rope_kernel_and_int8_linear_match_their_references(dtype):
    from gpt_fast_mixtral.kernels.attention import rope_rows
    from gpt_fast_mixtral.kernels.linear import reference_int8_linear
    from gpt_fast_mixtral.model import apply_rope
    from gpt_fast_mixtral.quantize import WeightOnlyInt8Linear, quantize_per_channel

    def relative_error(got, expected):
        return ((got.float() - expected.float()).norm() / expected.float().norm()).item()

    generator = torch.Generator(device="cuda").manual_seed(1)
    bound = dict(rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    # Mixtral's heads; an odd head_dim whose half is no power of two; one token
    for tokens, n_heads, n_kv_heads, head_dim in ((2048, 32, 8, 128), (37, 6, 2, 96), (1, 4, 4, 16)):
        qkv = torch.randn(tokens, (n_heads + 2 * n_kv_heads) * head_dim, device="cuda", generator=generator)
        qkv = qkv.to(dtype)
        angles = torch.rand(tokens, head_dim // 2, device="cuda", generator=generator) * 6
        table = torch.stack([angles.cos(), angles.sin()], dim=-1)
        cos, sin = table[..., 0], table[..., 1]  # strided views, as the model's rope table gives them
        got = rope_rows(qkv, cos, sin, n_heads, n_kv_heads, head_dim)
        for start, heads in ((0, n_heads), (n_heads, n_kv_heads)):
            columns = slice(start * head_dim, (start + heads) * head_dim)
            expected = apply_rope(qkv[:, columns].view(1, tokens, heads, head_dim), cos[None, :, None],
                                  sin[None, :, None])
            assert torch.allclose(got[:, columns].float(), expected.view(tokens, -1).float(), **bound)
        x = torch.randn(3, tokens, 512, device="cuda", generator=generator).to(dtype)
        layer = WeightOnlyInt8Linear(512, 300, device="cuda")
        layer.weight, layer.scales = quantize_per_channel(torch.randn(300, 512, device="cuda", generator=generator))
        got = layer(x)  # 3 x 2048 and 3 x 37 rows: prefill's dequantised weight; 3 rows: the kernel
        expected = reference_int8_linear(x.view(-1, 512), layer.weight, layer.scales).view(3, tokens, 300)
        assert got.dtype == dtype and relative_error(got, expected) < (5e-3 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_and_without_programmatic_dependent_launch(checkpoint, dtype):
    """kernels.pdl: the compiled one-token step with PDL (on sm_90+) and its block-end kernel gives the
    tokens (float32) / logits (bfloat16, int8) of the plain launches and the compiled block end."""
    from gpt_fast_mixtral.kernels import pdl
    from gpt_fast_mixtral.quantize import quantize_checkpoint

    if not pdl.active(torch.empty(1, device="cuda")):
        pytest.skip("programmatic dependent launch needs an sm_90+ GPU and a Triton with it")
    tokenizer = Tokenizer(checkpoint.parent / "tokenizer.model")
    paths = [checkpoint]
    if dtype == torch.bfloat16:
        paths.append(quantize_checkpoint(checkpoint, output_path=checkpoint.parent / "model_int8_pdl.pth",
                                         device="cuda"))
    params = [SamplingParams(max_new_tokens=24)]
    for path in paths:
        results = {}
        for enabled in (False, True):
            pdl.ENABLED = enabled
            torch._dynamo.reset()  # each model and setting compiles the step anew: stay under the recompile limit
            try:
                model = load_model(path, device="cuda", dtype=dtype)
                engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=128, compile=True)
                tokens = engine.generate(PROMPTS[:1], params)[0].tokens
                with torch.inference_mode():  # one eager step after the prompt and its tokens
                    logits = engine.model(torch.tensor([[5]], device="cuda"), torch.tensor([[60]], device="cuda"))
                results[enabled] = tokens, logits.float()
            finally:
                pdl.ENABLED = True
        if dtype == torch.float32:
            assert results[True][0] == results[False][0]
        (_, plain), (_, launched) = results[False], results[True]
        assert ((launched - plain).norm() / plain.norm()).item() < (1e-5 if dtype == torch.float32 else 2e-2)
