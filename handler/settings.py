"""Load-time settings of the Mixtral handler: the YAML `handler:` section, the device, the FX graph cache.

Apart from mixtral_handler.py because TorchServe requires the handler module to define exactly one class.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from gpt_fast_mixtral.tp import ALL_REDUCES, PARALLEL_MODES

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class HandlerSettings:
    """The `handler:` section of model_config.yaml. Paths are relative to the model directory."""

    converted_ckpt_dir: str  # the checkpoint file (model.pth or model_int8.pth), as in TorchServe's example
    compile: bool = False  # torch.compile the decode step (CUDA only; ignored on CPU)
    fx_graph_cache: bool = True  # reuse compiled graphs across restarts
    fx_graph_cache_dir: str = "inductor_cache"  # where they are kept
    max_new_tokens: int = 50  # a request's default
    stream: bool = False  # a request's default
    max_seq_len: int | None = None  # KV cache length, prompt and answer together (None: the engine's)
    dtype: str | None = None  # bfloat16 | float32 | float16 (None: bfloat16 on GPU, float32 on CPU)
    parallel_mode: str = "tp"  # under torchrun (parallelType: tp): tp slices every expert, ep splits the experts
    all_reduce: str = "push"  # on GPUs under torchrun: push or one-shot (symmetric memory) for decode, or nccl

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        """Check the section's types; a mistake fails the model load with a message naming the key."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        for key in sorted(set(section) - known):
            # A warning, not an error: TorchServe's own example configs carry keys such as `profile`.
            logger.warning("model_config.yaml handler.%s is not a setting of this handler; ignored", key)
        if "converted_ckpt_dir" not in section:
            raise ValueError("model_config.yaml needs handler.converted_ckpt_dir: the checkpoint file, "
                             "relative to the model directory (e.g. checkpoints/<repo>/model_int8.pth)")
        values = {key: value for key, value in section.items() if key in known}
        for key, value in values.items():
            _check_setting(key, value)
        return cls(**values)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype:
            return DTYPES[self.dtype]
        # bfloat16 halves GPU memory; on the CPU float32 matmuls are the faster ones.
        return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_setting(key: str, value: object) -> None:
    expected = {"converted_ckpt_dir": str, "fx_graph_cache_dir": str, "dtype": str, "compile": bool,
                "fx_graph_cache": bool, "stream": bool, "max_new_tokens": int, "max_seq_len": int,
                "parallel_mode": str, "all_reduce": str}[key]
    if value is None and key in ("max_seq_len", "dtype"):
        return
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model_config.yaml handler.{key} must be a positive integer, got {value!r}")
    elif not isinstance(value, expected):
        raise ValueError(f"model_config.yaml handler.{key} must be a {expected.__name__}, got {value!r}")
    if key == "dtype" and value not in DTYPES:
        raise ValueError(f"model_config.yaml handler.dtype must be one of {sorted(DTYPES)}, got {value!r}")
    if key == "all_reduce" and value not in ALL_REDUCES:
        raise ValueError(f"model_config.yaml handler.all_reduce must be one of {list(ALL_REDUCES)}, got {value!r}")
    if key == "parallel_mode" and value not in PARALLEL_MODES:
        raise ValueError(f"model_config.yaml handler.parallel_mode must be one of {list(PARALLEL_MODES)}, "
                         f"got {value!r}")


def enable_fx_graph_cache(enabled: bool, cache_dir: Path) -> None:
    """Point inductor at a persistent FX graph cache; call before anything compiles.

    TorchServe's example sets TORCHINDUCTOR_FX_GRAPH_CACHE in the environment from its handler, which
    is too late: inductor's config read that variable when it was first imported. The config attribute
    is what compilation consults. The cache directory, on the other hand, is read from the environment
    at compile time, so setting it here counts. By default it lives under the model directory, which
    outlives the worker and the machine's /tmp.
    """
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = enabled
    if enabled:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)


def select_device(device_type: str | None, gpu_id: int | None) -> torch.device:
    """The worker's device: TorchServe's gpu_id, or LOCAL_RANK under torchrun (TorchServe has then
    narrowed CUDA_VISIBLE_DEVICES to this worker's GPUs); the CPU for deviceType cpu."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available() or (gpu_id is None and local_rank is None):
        if device_type == "gpu":
            logger.warning("deviceType is gpu but no GPU was assigned or found; running on the CPU")
        return torch.device("cpu")
    return torch.device("cuda", int(local_rank) if local_rank is not None else gpu_id)


def resolve_path(model_dir: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else model_dir / candidate
