"""Reference checkpoints written by Hugging Face transformers, and the same weights in Mistral's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def save_hf_mixtral(out_dir: Path, tokenizer_path: Path, *, seed: int = 0, old_rope_form: bool = False,
                    max_shard_size: str = "5GB", **config: object):
    """Save a random `MixtralForCausalLM` with `save_pretrained`; return the (float32, eval) HF model."""
    import sentencepiece
    from transformers import MixtralConfig, MixtralForCausalLM

    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    defaults: dict[str, object] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
    defaults.update(config)
    rope_theta = defaults.pop("rope_theta")
    hf_config = MixtralConfig(**defaults, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    hf_config._attn_implementation = "eager"
    # transformers' default (grouped_mm) needs expert weights whose rows are multiples of 16 bytes: the
    # per-expert loop takes every size.
    hf_config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms test that we load them too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    shutil.copyfile(tokenizer_path, Path(out_dir) / "tokenizer.model")
    if old_rope_form:  # the form of configs written before transformers 5
        path = Path(out_dir) / "config.json"
        saved = json.loads(path.read_text())
        saved.pop("rope_parameters", None)
        saved["rope_theta"] = rope_theta
        path.write_text(json.dumps(saved))
    return model


def hf_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the q/k row permutation HF's conversion applies: back to Mistral's interleaved rotary pairs."""
    head_dim = weight.shape[0] // n_heads
    return weight.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)


def save_as_consolidated(model, out_dir: Path, tokenizer_path: Path, *, stacked_experts: bool = True,
                         parts: int = 2) -> None:
    """Write `model`'s weights as Mistral's `params.json` + `consolidated.0N.pt` (key-disjoint parts)."""
    cfg = model.config
    out_dir.mkdir(parents=True, exist_ok=True)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "head_dim": head_dim,
              "hidden_dim": cfg.intermediate_size, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps,
              "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_parameters["rope_theta"],
              "moe": {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok}}
    if cfg.sliding_window:
        params["sliding_window"] = cfg.sliding_window
    (out_dir / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")

    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ours: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        ours[dst + "attention.wq.weight"] = hf_to_interleaved(
            hf[src + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        ours[dst + "attention.wk.weight"] = hf_to_interleaved(
            hf[src + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        ours[dst + "attention.wv.weight"] = hf[src + "self_attn.v_proj.weight"]
        ours[dst + "attention.wo.weight"] = hf[src + "self_attn.o_proj.weight"]
        ours[dst + "attention_norm.weight"] = hf[src + "input_layernorm.weight"]
        ours[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        experts = {w: [_expert_weight(hf, src, e, w) for e in range(cfg.num_local_experts)]
                   for w in ("w1", "w2", "w3")}
        if stacked_experts:  # Mixtral-8x7B's release: [E * I, D] each, w2 transposed
            ours[dst + "block_sparse_moe.gate.weight"] = hf[src + "mlp.gate.weight"]
            for w, tensors in experts.items():
                rows = [t.T if w == "w2" else t for t in tensors]
                ours[f"{dst}block_sparse_moe.{w}"] = torch.cat(rows).contiguous()
        else:  # Mixtral-8x22B's release: one tensor per expert
            ours[dst + "feed_forward.gate.weight"] = hf[src + "mlp.gate.weight"]
            for w, tensors in experts.items():
                for e, t in enumerate(tensors):
                    ours[f"{dst}feed_forward.experts.{e}.{w}.weight"] = t
    names = sorted(ours)
    for part in range(parts):
        torch.save({k: ours[k] for k in names[part::parts]}, out_dir / f"consolidated.{part:02d}.pt")


def _expert_weight(hf: dict[str, torch.Tensor], prefix: str, expert: int, which: str) -> torch.Tensor:
    """One expert's w1/w2/w3 in nn.Linear layout from transformers 5's in-memory fused tensors."""
    gate_up = hf[prefix + "mlp.experts.gate_up_proj"][expert]
    if which == "w2":
        return hf[prefix + "mlp.experts.down_proj"][expert]
    return gate_up.chunk(2, dim=0)[0 if which == "w1" else 1]
