"""Our model matches Hugging Face transformers' MixtralForCausalLM: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import save_as_consolidated, save_hf_mixtral

from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
from gpt_fast_mixtral.generate import Engine, SamplingParams
from gpt_fast_mixtral.tokenizer import Tokenizer

CONFIGS = {
    # 6 query heads share each of 2 kv heads (3 per group), head_dim independent of hidden size.
    "gqa3_head_dim": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=80),
    # An odd number of experts and top-3 routing.
    "experts5_top3": dict(num_local_experts=5, num_experts_per_tok=3, num_hidden_layers=3),
    # A sliding window shorter than the 40-token prompt.
    "sliding_window": dict(sliding_window=12, num_key_value_heads=4),
    # A config.json written before transformers 5 (top-level rope_theta), and tied embeddings.
    "old_rope_form": dict(rope_theta=10_000.0, old_rope_form=True, num_key_value_heads=1),
    "tied_embeddings_sharded": dict(tie_word_embeddings=True, max_shard_size="100KB"),
    # One expert (top-1 of 1) and as many kv heads as query heads (MHA).
    "one_expert_mha": dict(num_local_experts=1, num_experts_per_tok=1, num_key_value_heads=4),
    # Every expert runs (top-3 of 3); sizes no power of two divides (hidden 72, intermediate 77, vocab 1031
    # against the tokenizer's 1024), head_dim 20 above hidden / heads = 12; other eps and rope theta.
    "all_experts_odd_sizes": dict(hidden_size=72, intermediate_size=77, num_attention_heads=6, num_key_value_heads=3,
                                  head_dim=20, num_local_experts=3, num_experts_per_tok=3, vocab_size=1031,
                                  rms_norm_eps=1e-3, rope_theta=500.0),
    # Sixteen experts, top-1, a window shorter than the prompts, a short context.
    "experts16_top1_window": dict(num_local_experts=16, num_experts_per_tok=1, sliding_window=7,
                                  max_position_embeddings=200),
}

SEQ_LEN = 40


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory, tiny_tokenizer_path):
    """(HF model, our float32 model) built from the same save_pretrained checkpoint."""
    out_dir = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_mixtral(out_dir, tiny_tokenizer_path, seed=1, **CONFIGS[request.param])
    ours = load_model(convert_checkpoint(out_dir), device="cpu", dtype=torch.float32)
    return hf_model, ours, out_dir


def test_logits_match_transformers(converted):
    hf_model, ours, _ = converted
    torch.manual_seed(0)
    tokens = torch.randint(3, ours.args.vocab_size, (2, SEQ_LEN))
    ours.setup_caches(max_batch_size=2, max_seq_len=64)
    with torch.inference_mode():
        reference = hf_model(tokens).logits
        logits = ours(tokens, torch.arange(SEQ_LEN).expand(2, SEQ_LEN))
    assert logits.shape == reference.shape
    assert relative_error(logits, reference) < 1e-5


def test_incremental_decode_matches_full_forward(converted):
    """Prefill then one token at a time gives the same logits as the whole sequence at once."""
    hf_model, ours, _ = converted
    torch.manual_seed(1)
    tokens = torch.randint(3, ours.args.vocab_size, (1, 24))
    ours.setup_caches(max_batch_size=1, max_seq_len=32)
    with torch.inference_mode():
        reference = hf_model(tokens).logits
        prefill = ours(tokens[:, :10], torch.arange(10)[None], kv_len=10)
        steps = [ours(tokens[:, i:i + 1], torch.tensor([[i]])) for i in range(10, 24)]
    logits = torch.cat([prefill, *steps], dim=1)
    assert relative_error(logits, reference) < 1e-5


def test_greedy_generation_matches_transformers(converted, tiny_tokenizer_path):
    hf_model, ours, _ = converted
    engine = Engine(ours, Tokenizer(tiny_tokenizer_path), max_batch_size=2, max_seq_len=128)
    prompts = [engine.encode("The capital of France is"), engine.encode("Mixture of experts models route")]
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=32)] * 2)
    for prompt, result in zip(prompts, results, strict=True):
        with torch.inference_mode():
            reference = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.tokens == reference


@pytest.mark.parametrize("converted", [name for name in sorted(CONFIGS) if "tied" not in name],
                         indirect=True)  # Mistral's original format has no tied-embedding variant
def test_consolidated_format_gives_the_same_logits(converted, tmp_path, tiny_tokenizer_path):
    hf_model, ours, _ = converted
    torch.manual_seed(2)
    tokens = torch.randint(3, ours.args.vocab_size, (1, SEQ_LEN))
    ours.setup_caches(1, 64)
    with torch.inference_mode():
        expected = ours(tokens, torch.arange(SEQ_LEN)[None])
    for stacked in (True, False):
        mistral_dir = tmp_path / f"stacked_{stacked}"
        save_as_consolidated(hf_model, mistral_dir, tiny_tokenizer_path, stacked_experts=stacked)
        from_mistral = load_model(convert_checkpoint(mistral_dir), device="cpu", dtype=torch.float32)
        from_mistral.setup_caches(1, 64)
        with torch.inference_mode():
            logits = from_mistral(tokens, torch.arange(SEQ_LEN)[None])
        assert relative_error(logits, expected) < 1e-6
        assert (mistral_dir / "config.json").is_file(), "convert writes the HF config it derived"


def test_bfloat16_model_stays_close_to_float32(converted):
    hf_model, ours, out_dir = converted
    bf16 = load_model(Path(out_dir) / "model.pth", device="cpu", dtype=torch.bfloat16)
    tokens = torch.randint(3, ours.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    for model in (ours, bf16):
        model.setup_caches(1, 32)
    with torch.inference_mode():
        reference = ours(tokens, torch.arange(16)[None])
        logits = bf16(tokens, torch.arange(16)[None]).float()
    assert relative_error(logits, reference) < 0.05


@pytest.mark.parametrize("shape,k", [((5, 8), 2), ((3, 7, 5), 3), ((4, 8), 8), ((2, 1), 1)])
def test_routing_top_k_equals_torch_topk(shape, k):
    from gpt_fast_mixtral.model import top_k

    probs = torch.randn(*shape, generator=torch.Generator().manual_seed(k)).softmax(-1)
    values, indices = top_k(probs, k)
    expected_values, expected_indices = torch.topk(probs, k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


def test_transformers5_fused_expert_names_on_disk_give_the_same_logits(tmp_path, tiny_tokenizer_path):
    """A checkpoint saved under transformers 5's in-memory names (mlp.gate, mlp.experts.gate_up_proj
    [E, 2I, D] and down_proj [E, D, I]) instead of the per-expert names save_pretrained writes."""
    from safetensors.torch import save_file

    hf_model = save_hf_mixtral(tmp_path, tiny_tokenizer_path, seed=6, num_local_experts=3, intermediate_size=40)
    for path in tmp_path.glob("*.safetensors"):
        path.unlink()
    state = {name: tensor.contiguous() for name, tensor in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(convert_checkpoint(tmp_path), device="cpu", dtype=torch.float32)
    tokens = torch.randint(3, ours.args.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    ours.setup_caches(2, 64)
    with torch.inference_mode():
        reference = hf_model(tokens).logits
        logits = ours(tokens, torch.arange(SEQ_LEN).expand(2, SEQ_LEN))
    assert relative_error(logits, reference) < 1e-5
