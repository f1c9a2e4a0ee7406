"""ModelArgs: built from the real Mixtral config.json files (either transformers generation) and Mistral's
params.json; anything that is not a Mixtral-shaped model is refused with a ConfigError that says why."""

import json
from pathlib import Path

import pytest

from gpt_fast_mixtral.config import ConfigError, ModelArgs, load_model_args

# mistralai/Mixtral-8x7B-v0.1/config.json, as published (written by transformers 4.x: top-level rope_theta).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# mistralai/Mixtral-8x22B-v0.1/config.json, as published.
MIXTRAL_8X22B = {
    **MIXTRAL_8X7B,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "max_position_embeddings": 65536,
    "num_attention_heads": 48,
    "num_hidden_layers": 56,
    "num_key_value_heads": 8,
    "router_aux_loss_coef": 0.001,
    "transformers_version": "4.38.0",
    "vocab_size": 32768,
}

EXPECTED_8X7B = ModelArgs(
    vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
    num_experts=8, num_experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
    max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

EXPECTED_8X22B = ModelArgs(
    vocab_size=32768, dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, intermediate_size=16384,
    num_experts=8, num_experts_per_tok=2, norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
    max_position_embeddings=65536, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def in_transformers5_form(config: dict) -> dict:
    """The same config as transformers 5 writes it: rope settings under `rope_parameters`, head_dim null."""
    config = dict(config)
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    config["head_dim"] = None
    config["dtype"] = config.pop("torch_dtype")
    return config


# ---------------------------------------------------------------------------------------------------
# The real configs.


@pytest.mark.parametrize(("config", "expected"), [(MIXTRAL_8X7B, EXPECTED_8X7B), (MIXTRAL_8X22B, EXPECTED_8X22B)],
                         ids=["8x7B", "8x22B"])
def test_published_mixtral_configs_give_their_exact_shapes(config, expected):
    assert ModelArgs.from_hf_config(config) == expected


@pytest.mark.parametrize(("config", "expected"), [(MIXTRAL_8X7B, EXPECTED_8X7B), (MIXTRAL_8X22B, EXPECTED_8X22B)],
                         ids=["8x7B", "8x22B"])
def test_rope_parameters_form_of_transformers5_gives_the_same_args(config, expected):
    assert ModelArgs.from_hf_config(in_transformers5_form(config)) == expected


def test_rope_theta_is_read_from_rope_parameters_when_both_forms_are_present():
    config = {**MIXTRAL_8X7B, "rope_theta": 10_000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert ModelArgs.from_hf_config(config).rope_theta == 5e5


def test_old_rope_scaling_null_keeps_the_top_level_rope_theta():
    config = {**MIXTRAL_8X7B, "rope_theta": 10_000.0, "rope_scaling": None}
    assert ModelArgs.from_hf_config(config).rope_theta == 10_000.0


def test_head_dim_null_or_absent_is_hidden_size_over_heads():
    absent = {k: v for k, v in MIXTRAL_8X7B.items() if k != "head_dim"}
    assert ModelArgs.from_hf_config(absent).head_dim == 4096 // 32
    assert ModelArgs.from_hf_config({**MIXTRAL_8X7B, "head_dim": None}).head_dim == 128


def test_explicit_head_dim_wins_over_hidden_size_over_heads():
    args = ModelArgs.from_hf_config({**MIXTRAL_8X7B, "head_dim": 64})
    assert args.head_dim == 64
    assert args.qkv_out_features == (32 + 2 * 8) * 64


def test_sliding_window_and_eos_list_are_read():
    args = ModelArgs.from_hf_config({**MIXTRAL_8X7B, "sliding_window": 4096, "eos_token_id": [2, 7]})
    assert args.sliding_window == 4096
    assert args.eos_token_id == 2


def test_missing_num_key_value_heads_means_one_kv_head_per_query_head():
    config = {k: v for k, v in MIXTRAL_8X7B.items() if k != "num_key_value_heads"}
    assert ModelArgs.from_hf_config(config).n_kv_heads == 32


def test_to_hf_config_round_trips():
    assert ModelArgs.from_hf_config(EXPECTED_8X22B.to_hf_config()) == EXPECTED_8X22B


# ---------------------------------------------------------------------------------------------------
# Mistral's params.json.

MIXTRAL_8X7B_PARAMS = {
    "dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
    "norm_eps": 1e-05, "vocab_size": 32000, "rope_theta": 1e6,
    "moe": {"num_experts_per_tok": 2, "num_experts": 8},
}


def test_from_mistral_params_matches_the_hf_config_of_the_same_model():
    assert ModelArgs.from_mistral_params(MIXTRAL_8X7B_PARAMS) == EXPECTED_8X7B


def test_from_mistral_params_derives_head_dim_and_kv_heads_when_absent():
    params = {k: v for k, v in MIXTRAL_8X7B_PARAMS.items() if k not in ("head_dim", "n_kv_heads")}
    args = ModelArgs.from_mistral_params(params)
    assert (args.head_dim, args.n_kv_heads) == (128, 32)


def test_dense_params_json_is_refused():
    params = {k: v for k, v in MIXTRAL_8X7B_PARAMS.items() if k != "moe"}
    with pytest.raises(ConfigError, match="no 'moe' section"):
        ModelArgs.from_mistral_params(params)


def test_params_json_missing_keys_are_named():
    params = {k: v for k, v in MIXTRAL_8X7B_PARAMS.items() if k != "n_heads"}
    params["moe"] = {"num_experts": 8}
    with pytest.raises(ConfigError, match=r"lacks n_heads, moe\.num_experts_per_tok"):
        ModelArgs.from_mistral_params(params)


# ---------------------------------------------------------------------------------------------------
# What is refused.


def test_llama_config_is_refused_naming_the_model_type():
    with pytest.raises(ConfigError, match="model_type='llama'.*only Mixtral"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "model_type": "llama"})


def test_missing_keys_are_all_named():
    config = {k: v for k, v in MIXTRAL_8X7B.items() if k not in ("num_local_experts", "intermediate_size")}
    with pytest.raises(ConfigError, match="lacks intermediate_size, num_local_experts"):
        ModelArgs.from_hf_config(config)


def test_dense_mistral_config_is_refused():
    config = {k: v for k, v in MIXTRAL_8X7B.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    config["model_type"] = "mistral"
    with pytest.raises(ConfigError, match="model_type='mistral'"):
        ModelArgs.from_hf_config(config)


def test_heads_not_divisible_by_kv_heads_are_refused():
    message = r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(6\)"
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "num_key_value_heads": 6})


def test_top_k_above_the_number_of_experts_is_refused():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) exceeds num_local_experts \(8\)"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "num_experts_per_tok": 9})


@pytest.mark.parametrize("method", ["fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_a_prequantized_checkpoint_is_refused_saying_what_to_download(method):
    with pytest.raises(ConfigError, match=rf"quantized \({method}\).*unquantized.*scripts/quantize.py"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "quantization_config": {"quant_method": method, "bits": 4}})


def test_a_null_quantization_config_is_no_quantization():
    assert ModelArgs.from_hf_config({**MIXTRAL_8X7B, "quantization_config": None}) == EXPECTED_8X7B


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_an_activation_other_than_silu_is_refused(act):
    """Our experts (and the GPU kernels) compute SiLU; transformers honours hidden_act, so a gelu model
    converted silently gave other logits (measured: max error 1.2% of the largest logit, tiny model)."""
    with pytest.raises(ConfigError, match=f"hidden_act {act!r} is not supported.*silu"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "hidden_act": act})


@pytest.mark.parametrize("act", ["silu", "swish", None])
def test_silu_by_either_name_or_absent_is_accepted(act):
    config = {**MIXTRAL_8X7B, "hidden_act": act} if act else {k: v for k, v in MIXTRAL_8X7B.items()
                                                                if k != "hidden_act"}
    assert ModelArgs.from_hf_config(config) == EXPECTED_8X7B


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_yarn_rope_is_refused(form):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, form: rope})


def test_old_style_linear_rope_scaling_is_refused():
    with pytest.raises(ConfigError, match="rope type 'linear'"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, "rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize(("key", "value"), [("hidden_size", 0), ("num_hidden_layers", -1), ("vocab_size", 3.5)])
def test_non_positive_or_non_integer_sizes_are_refused(key, value):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, key: value})


@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta", "max_position_embeddings", "bos_token_id"])
def test_null_optional_values_take_their_defaults(key):
    args = ModelArgs.from_hf_config({**MIXTRAL_8X7B, key: None})
    assert getattr(args, {"rms_norm_eps": "norm_eps"}.get(key, key)) == getattr(EXPECTED_8X7B, {
        "rms_norm_eps": "norm_eps"}.get(key, key))


@pytest.mark.parametrize(("key", "value"), [("rms_norm_eps", "tiny"), ("rope_theta", [1e6]), ("eos_token_id", "x"),
                                            ("sliding_window", "4096"), ("sliding_window", 4096.5),
                                            ("rope_parameters", "default"), ("num_attention_heads", None)])
def test_values_of_the_wrong_type_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelArgs.from_hf_config({**MIXTRAL_8X7B, key: value})


@pytest.mark.parametrize(("key", "value"), [("norm_eps", "small"), ("rope_theta", "big"), ("n_kv_heads", "8"),
                                            ("dim", None), ("moe", [8, 2]), ("sliding_window", "4096")])
def test_params_json_values_of_the_wrong_type_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        ModelArgs.from_mistral_params({**MIXTRAL_8X7B_PARAMS, key: value})


@pytest.mark.parametrize("content", ["[1, 2]", '"mixtral"', "null"])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path: Path, content: str):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match="config.json must hold a JSON object"):
        load_model_args(tmp_path)


def test_config_error_is_a_value_error():
    """CLIs and the handler catch ValueError; ConfigError must be one."""
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------------
# load_model_args: what a checkpoint directory holds.


def test_load_model_args_reads_config_json(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(in_transformers5_form(MIXTRAL_8X22B)))
    assert load_model_args(tmp_path) == EXPECTED_8X22B


def test_load_model_args_prefers_config_json_over_params_json(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X22B))
    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X7B_PARAMS))
    assert load_model_args(tmp_path) == EXPECTED_8X22B


def test_load_model_args_falls_back_to_params_json(tmp_path: Path):
    (tmp_path / "params.json").write_text(json.dumps(MIXTRAL_8X7B_PARAMS))
    assert load_model_args(tmp_path) == EXPECTED_8X7B


def test_load_model_args_without_any_config_says_what_to_keep(tmp_path: Path):
    with pytest.raises(ConfigError, match="no config.json or params.json in"):
        load_model_args(tmp_path)


def test_load_model_args_never_guesses_from_the_directory_name(tmp_path: Path):
    named = tmp_path / "Mixtral-8x7B-v0.1"
    named.mkdir()
    with pytest.raises(ConfigError):
        load_model_args(named)


def test_invalid_json_is_a_config_error_naming_the_file(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_model_args(tmp_path)
