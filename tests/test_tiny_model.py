"""The tiny Mixtral checkpoint: a real Hugging Face layout that transformers loads without complaint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gpt_fast_mixtral.config import ModelArgs, load_model_args
from gpt_fast_mixtral.tiny_model import hf_state_dict, make_tiny_model, tiny_model_args, train_tokenizer
from gpt_fast_mixtral.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def expected_keys(args: ModelArgs) -> set[str]:
    """The names `MixtralForCausalLM.save_pretrained` writes (per-expert w1/w2/w3 layout)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(args.n_layers):
        prefix = f"model.layers.{layer}"
        keys |= {f"{prefix}.self_attn.{name}_proj.weight" for name in "qkvo"}
        keys |= {f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"}
        keys.add(f"{prefix}.block_sparse_moe.gate.weight")
        keys |= {f"{prefix}.block_sparse_moe.experts.{expert}.w{w}.weight"
                 for expert in range(args.num_experts) for w in (1, 2, 3)}
    return keys


def test_directory_holds_a_mixtral_checkpoint(tiny_checkpoint_dir: Path) -> None:
    names = {path.name for path in tiny_checkpoint_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "model.safetensors"} <= names
    args = load_model_args(tiny_checkpoint_dir)
    assert args == ModelArgs(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                             intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=1024, rope_theta=1e6, sliding_window=None)
    assert Tokenizer(tiny_checkpoint_dir).vocab_size == args.vocab_size
    config = json.loads((tiny_checkpoint_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == "float32"


def test_weights_use_hugging_face_names_shapes_and_metadata(tiny_checkpoint_dir: Path) -> None:
    args = load_model_args(tiny_checkpoint_dir)
    path = tiny_checkpoint_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    state = load_file(str(path))
    assert set(state) == expected_keys(args)
    kv_features = args.n_kv_heads * args.head_dim
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (kv_features, args.dim)
    assert state["model.layers.1.block_sparse_moe.experts.7.w2.weight"].shape == (args.dim, 128)
    assert state["model.layers.1.block_sparse_moe.gate.weight"].shape == (args.num_experts, args.dim)
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


def test_default_dtype_is_bfloat16(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path, seed=0, n_layers=1, num_experts=2, num_experts_per_tok=1)
    assert {tensor.dtype for tensor in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_weights_are_determined_by_the_seed() -> None:
    args = tiny_model_args(256, n_layers=1)
    first, again = hf_state_dict(args, seed=0), hf_state_dict(args, seed=0)
    other = hf_state_dict(args, seed=1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_tokenizer_training_is_reproducible(tmp_path: Path, tiny_tokenizer_path: Path) -> None:
    again = train_tokenizer(tmp_path / "again.model")
    assert again.read_bytes() == tiny_tokenizer_path.read_bytes()


def test_overrides_reshape_the_model() -> None:
    args = tiny_model_args(512, dim=128, n_layers=3, num_experts=4, num_experts_per_tok=1, sliding_window=32)
    shape = (args.dim, args.head_dim, args.n_layers, args.num_experts, args.sliding_window)
    assert shape == (128, 32, 3, 4, 32)  # head_dim follows dim / n_heads
    with pytest.raises(TypeError, match="unknown model overrides"):
        tiny_model_args(512, experts=4)


def test_transformers_loads_every_weight(tiny_checkpoint_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.MixtralForCausalLM.from_pretrained(
        tiny_checkpoint_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info.get("error_msgs")
    # Layout-agnostic: every stored value ends up in some parameter, and no parameter was left random.
    state = load_file(str(tiny_checkpoint_dir / "model.safetensors"))
    stored = torch.cat([tensor.flatten() for tensor in state.values()])
    loaded = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    assert torch.equal(stored.sort().values, loaded.sort().values)


def test_greedy_generation_is_not_one_repeated_token(tiny_checkpoint_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(tiny_checkpoint_dir).eval()
    tokenizer = Tokenizer(tiny_checkpoint_dir)
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(prompt).logits
        output = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_id)
    assert torch.isfinite(logits).all()
    generated = output[0, prompt.shape[1]:].tolist()
    assert len(set(generated)) >= 3, generated
    assert tokenizer.decode(generated, continuation=True)


def test_checkpoint_tokenizer_encodes_and_decodes(tiny_checkpoint_dir: Path) -> None:
    tokenizer = Tokenizer(tiny_checkpoint_dir / "tokenizer.model")
    ids = tokenizer.encode("def generate(prompt): 日本")
    assert ids[0] == tokenizer.bos_id and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == "def generate(prompt): 日本"


def test_making_a_model_needs_no_transformers(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"  # any import of it now fails
            "from gpt_fast_mixtral.tiny_model import make_tiny_model\n"
            f"make_tiny_model({str(tmp_path)!r}, n_layers=1, num_experts=2, num_experts_per_tok=1)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
    assert (tmp_path / "model.safetensors").is_file()


def test_cli_writes_the_checkpoint_and_says_where(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", "--out", str(out), "--seed", "3", "--layers", "1",
         "--experts", "4", "--top-k", "2", "--sliding-window", "64", "--dtype", "float32"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    args = load_model_args(out)
    assert (args.n_layers, args.num_experts, args.num_experts_per_tok, args.sliding_window) == (1, 4, 2, 64)
    assert set(load_file(str(out / "model.safetensors"))) == expected_keys(args)


def test_cli_rejects_an_impossible_shape_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", "--out", str(out), "--experts", "2", "--top-k", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "num_experts_per_tok (3) exceeds num_local_experts (2)" in result.stderr
    assert not out.exists()
