"""Model hyper-parameters, read from a Hugging Face `config.json` or Mistral's `params.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The configuration does not describe a Mixtral-shaped model we can run."""


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                    "intermediate_size", "num_experts", "num_experts_per_tok", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_experts})")
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ConfigError(f"sliding_window must be null or a positive integer, got {window!r}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")

    @property
    def qkv_out_features(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face `MixtralConfig` dictionary (any transformers version)."""
        config = check_hf_model_kind(config)
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "num_local_experts", "num_experts_per_tok")
        missing = [key for key in required if key not in config]
        if missing:
            raise ConfigError(
                f"config.json lacks {', '.join(missing)}: it does not describe a Mixtral-shaped MoE model")
        for key in required:
            _positive_int(config, key, "config.json")
        n_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=config["intermediate_size"],
            num_experts=config["num_local_experts"],
            num_experts_per_tok=config["num_experts_per_tok"],
            norm_eps=_number(config, "rms_norm_eps", 1e-5, "config.json"),
            rope_theta=_rope_theta(config),
            sliding_window=config.get("sliding_window"),
            max_position_embeddings=_or_default(config.get("max_position_embeddings"), 32768),
            bos_token_id=_first_id(config, "bos_token_id", 1),
            eos_token_id=_first_id(config, "eos_token_id", 2),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> ModelArgs:
        """Build from the `params.json` that ships with Mistral's original `consolidated.*.pt` files."""
        params = check_mistral_model_kind(params)
        moe = params["moe"]
        if not isinstance(moe, dict):
            raise ConfigError(f"params.json's moe must be an object with num_experts and num_experts_per_tok, "
                              f"got {moe!r}")
        missing = [key for key in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim") if key not in params]
        missing += [f"moe.{key}" for key in ("num_experts", "num_experts_per_tok") if key not in moe]
        if missing:
            raise ConfigError(f"params.json lacks {', '.join(missing)}: it does not describe a Mixtral model")
        for key in ("dim", "n_heads"):
            _positive_int(params, key, "params.json")
        n_heads = params["n_heads"]
        return cls(
            vocab_size=params["vocab_size"],
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads", n_heads),
            head_dim=params.get("head_dim") or params["dim"] // n_heads,
            intermediate_size=params["hidden_dim"],
            num_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"],
            norm_eps=_number(params, "norm_eps", 1e-5, "params.json"),
            rope_theta=_number(params, "rope_theta", 1e6, "params.json"),
            sliding_window=params.get("sliding_window"),
            max_position_embeddings=_or_default(params.get("max_seq_len"), 32768),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` that describes the same model."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_hf_model_kind(config: Any) -> dict[str, Any]:
    """Refuse a Hugging Face config.json of a model this engine cannot run whatever its sizes (another
    architecture, weights already quantized, another activation); return it as a dictionary."""
    config = _json_object(config, "config.json")
    model_type = config.get("model_type")
    if model_type not in (None, "mixtral"):
        raise ConfigError(
            f"config.json has model_type={model_type!r}; only Mixtral-shaped MoE models "
            "(model_type 'mixtral') are supported")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise ConfigError(
            f"config.json describes a checkpoint already quantized ({method}): the converter reads "
            "unquantized weights (bfloat16, float16 or float32) only; download the unquantized release "
            "(e.g. mistralai/Mixtral-8x7B-v0.1) and make int8 weights with scripts/quantize.py")
    act = config.get("hidden_act") or "silu"
    if act not in ("silu", "swish"):  # transformers' names for the same function
        raise ConfigError(
            f"config.json: hidden_act {act!r} is not supported: the experts of this engine compute "
            "SiLU (hidden_act 'silu', as every Mixtral does)")
    return config


def check_mistral_model_kind(params: Any) -> dict[str, Any]:
    """Refuse a Mistral params.json of a dense model; return it as a dictionary."""
    params = _json_object(params, "params.json")
    if not params.get("moe"):
        raise ConfigError("params.json has no 'moe' section: it describes a dense model, not a MoE")
    return params


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
        raise ConfigError(f"config.json's {key} must be an object (or null), got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"rope type {rope_type!r} is not supported; only plain RoPE ('default') is")
    if params.get("rope_theta") is not None:
        return _number(params, "rope_theta", 1e6, "config.json's rope parameters")
    return _number(config, "rope_theta", 1e6, "config.json")


def _json_object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must hold a JSON object (the model's settings), got {type(value).__name__}: "
                          f"replace it with the {name} of the checkpoint")
    return value


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _number(source: dict[str, Any], key: str, default: float, where: str) -> float:
    """source[key] as a float; absent or null is `default`."""
    value = source.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None


def _positive_int(source: dict[str, Any], key: str, where: str) -> int:
    value = source[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _first_id(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config.json: {key} must be a token id (an integer or a list of them), got {value!r}")
    return value


def load_model_args(checkpoint_dir: str | Path) -> ModelArgs:
    """Read `config.json` (or Mistral's `params.json`) from a checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    hf_config = checkpoint_dir / "config.json"
    if hf_config.is_file():
        return ModelArgs.from_hf_config(_read_json(hf_config))
    params = checkpoint_dir / "params.json"
    if params.is_file():
        return ModelArgs.from_mistral_params(_read_json(params))
    raise ConfigError(
        f"no config.json or params.json in {checkpoint_dir}: keep the Hugging Face config.json next to "
        "the checkpoint (scripts/convert_hf_checkpoint.py copies it there)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
