"""gpt-fast-style Mixtral (Mixture-of-Experts) inference engine in plain PyTorch."""

from gpt_fast_mixtral.config import ConfigError, ModelArgs, load_model_args

__all__ = ["ConfigError", "ModelArgs", "load_model_args"]
__version__ = "0.1.0"
