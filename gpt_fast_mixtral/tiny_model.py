"""A tiny Mixtral-shaped Hugging Face checkpoint (random weights, real tokenizer) for tests and the demo.

Nothing here imports transformers: the demo environment does not have it. The files follow the layout
`MixtralForCausalLM.save_pretrained` writes, so the same directory feeds both our converter and
transformers (the tests load it there).
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from gpt_fast_mixtral.config import ModelArgs

# Pure-Python standard-library modules whose source is the tokenizer's training text: always on the
# machine, and fixed for a given Python version, so the trained tokenizer is reproducible.
_CORPUS_MODULES = (
    "argparse", "calendar", "codecs", "collections", "csv", "dataclasses", "difflib", "email.message",
    "fractions", "functools", "html", "json", "pathlib", "random", "statistics", "string", "textwrap",
    "typing",
)

TINY_VOCAB_SIZE = 1024
TINY_DEFAULTS: dict[str, Any] = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 1e6,
    "sliding_window": None,
}

# Large enough that the logits depend on the token (greedy output is not one token repeated), while the
# std 0.02 used inside the blocks keeps activations tame in bfloat16.
EMBEDDING_STD = 0.2
LINEAR_STD = 0.02


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        try:
            text = inspect.getsource(module)
        except (OSError, TypeError):  # source not installed: the docstrings still exist (unless -OO)
            text = "\n".join(filter(None, (inspect.getdoc(obj) for _, obj in inspect.getmembers(module))))
        lines.extend(line for line in text.splitlines() if line.strip())
    if not lines:
        raise RuntimeError("no standard-library source or docstrings found to train the tiny tokenizer on")
    return lines


def train_tokenizer(out_path: Path, vocab_size: int = TINY_VOCAB_SIZE) -> Path:
    """Train a byte-fallback BPE sentencepiece model laid out like Mistral's (<unk>=0, <s>=1, </s>=2)."""
    out_path = Path(out_path)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_corpus_lines()),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # The normalizer settings Llama/Mistral tokenizers use: text is kept as is, spaces included.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=1.0,
            # Every sentence, in order, on one thread: the same model on every run.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(f"could not train a tokenizer with vocab_size={vocab_size}: {error}") from error
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


def tiny_model_args(vocab_size: int, **overrides: Any) -> ModelArgs:
    """The tiny shape, with `overrides` (ModelArgs field names) applied; head_dim follows dim/n_heads
    unless given."""
    known = {field.name for field in fields(ModelArgs)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown model overrides {unknown}; valid names: {sorted(known)}")
    shape = {**TINY_DEFAULTS, "vocab_size": vocab_size, **overrides}
    if "head_dim" not in overrides and ("dim" in overrides or "n_heads" in overrides):
        shape["head_dim"] = shape["dim"] // shape["n_heads"]
    return ModelArgs(**shape)


def hf_state_dict(args: ModelArgs, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names of Hugging Face's Mixtral checkpoints."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = LINEAR_STD) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    def norm_weight() -> torch.Tensor:
        # Not all ones, so a converter that swaps or drops a norm produces different logits.
        return (1.0 + 0.1 * torch.randn(args.dim, generator=generator)).to(dtype)

    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    state = {"model.embed_tokens.weight": normal(args.vocab_size, args.dim, std=EMBEDDING_STD)}
    for layer in range(args.n_layers):
        prefix = f"model.layers.{layer}"
        state[f"{prefix}.self_attn.q_proj.weight"] = normal(q_out, args.dim)
        state[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_out, args.dim)
        state[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_out, args.dim)
        state[f"{prefix}.self_attn.o_proj.weight"] = normal(args.dim, q_out)
        state[f"{prefix}.block_sparse_moe.gate.weight"] = normal(args.num_experts, args.dim)
        for expert in range(args.num_experts):
            expert_prefix = f"{prefix}.block_sparse_moe.experts.{expert}"
            state[f"{expert_prefix}.w1.weight"] = normal(args.intermediate_size, args.dim)
            state[f"{expert_prefix}.w2.weight"] = normal(args.dim, args.intermediate_size)
            state[f"{expert_prefix}.w3.weight"] = normal(args.intermediate_size, args.dim)
        state[f"{prefix}.input_layernorm.weight"] = norm_weight()
        state[f"{prefix}.post_attention_layernorm.weight"] = norm_weight()
    state["model.norm.weight"] = norm_weight()
    if not args.tie_word_embeddings:
        state["lm_head.weight"] = normal(args.vocab_size, args.dim, std=EMBEDDING_STD)
    return state


def make_tiny_model(out_dir: Path, seed: int = 0, *, dtype: torch.dtype | str = torch.bfloat16,
                    **overrides: Any) -> Path:
    """Write a tiny Mixtral checkpoint directory (config.json, generation_config.json, tokenizer.model,
    model.safetensors) and return it. `overrides` are ModelArgs field names; `vocab_size` sets the
    tokenizer's size too, so model and tokenizer always agree."""
    out_dir = Path(out_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")

    vocab_size = overrides.pop("vocab_size", TINY_VOCAB_SIZE)
    args = tiny_model_args(vocab_size, **overrides)  # a bad shape fails before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = train_tokenizer(out_dir / "tokenizer.model", vocab_size)
    trained_vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    if trained_vocab != args.vocab_size:
        raise ValueError(f"trained tokenizer has {trained_vocab} pieces, expected {args.vocab_size}")

    config = args.to_hf_config()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    weights_path = out_dir / "model.safetensors"
    save_file(hf_state_dict(args, seed, dtype), str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates it owner-only; a TorchServe user must read it too
    return out_dir


__all__ = [
    "TINY_DEFAULTS", "TINY_VOCAB_SIZE", "hf_state_dict", "make_tiny_model", "tiny_model_args",
    "train_tokenizer",
]
