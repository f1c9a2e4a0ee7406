"""Checkpoint conversion and loading.

Conversion is a mapping from checkpoint names to our parameters, applied one layer at a time: the
output file's layout is written first with no data (`torch.serialization.skip_data`), then mapped with
`MAP_SHARED` and filled in place, so peak memory stays near one layer however large the model is.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from gpt_fast_mixtral.config import ModelArgs, load_model_args
from gpt_fast_mixtral.model import Transformer

OUR_CHECKPOINT = "model.pth"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its config."""


# ---------------------------------------------------------------------------------------------------
# Sources: lazy, random access by name, so a layer can be read without reading its shard whole.


class _SafetensorsSource:
    def __init__(self, checkpoint_dir: Path) -> None:
        index_path = checkpoint_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = _read_weight_map(index_path)
        else:
            files = sorted(checkpoint_dir.glob("*.safetensors"))
            if len(files) != 1:
                raise CheckpointError(
                    f"{checkpoint_dir} has {len(files)} .safetensors files and no "
                    "model.safetensors.index.json: re-download the checkpoint with scripts/download.py")
            with _open_safetensors(files[0]) as handle:
                weight_map = dict.fromkeys(handle.keys(), files[0].name)
        missing = sorted({name for name in weight_map.values() if not (checkpoint_dir / name).is_file()})
        if missing:
            raise CheckpointError(
                f"{checkpoint_dir} lacks {len(missing)} shard(s) named in its index, e.g. {missing[0]}: "
                "the download is incomplete; run scripts/download.py again to finish it")
        self._weight_map = weight_map
        self._handles = {name: _open_safetensors(checkpoint_dir / name)
                         for name in sorted(set(weight_map.values()))}

    def keys(self) -> set[str]:
        return set(self._weight_map)

    def get(self, key: str) -> Tensor:
        return self._handles[self._weight_map[key]].get_tensor(key)


def _open_safetensors(path: Path):  # noqa: ANN202 (safetensors' handle type is private)
    """safe_open, with a damaged file (truncated or cut short by a failed download) as a CheckpointError."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # SafetensorError: header too small or too large, file not fully covered
        raise CheckpointError(
            f"cannot read {path} ({error}): the file is damaged or incomplete; delete it and run "
            "scripts/download.py again to fetch it") from error


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        weight_map = error
    if not isinstance(weight_map, dict) or not all(
            isinstance(key, str) and isinstance(name, str) for key, name in weight_map.items()):
        reason = f" ({weight_map})" if isinstance(weight_map, Exception) else ""
        raise CheckpointError(
            f"{index_path} is not a valid safetensors index (a JSON object whose 'weight_map' maps tensor names "
            f"to shard files){reason}: delete it and run scripts/download.py again to fetch it")
    return weight_map


class _TorchSource:
    """Mistral's original `consolidated.*.pt(h)` files: key-disjoint parts, loaded lazily with mmap."""

    def __init__(self, files: list[Path]) -> None:
        self._tensors: dict[str, Tensor] = {}
        for path in files:
            try:
                part = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            except Exception as error:  # a truncated download surfaces here as a zip/pickle error
                raise CheckpointError(f"cannot read {path}: {error}; re-download it") from error
            if not isinstance(part, dict) or not all(isinstance(t, Tensor) for t in part.values()):
                raise CheckpointError(
                    f"cannot read {path}: it holds a {type(part).__name__}, not the named tensors of a Mistral "
                    "checkpoint; re-download it with scripts/download.py")
            duplicated = self._tensors.keys() & part.keys()
            if duplicated:
                raise CheckpointError(
                    f"{path} repeats {sorted(duplicated)[0]}: tensor-parallel shards of the original "
                    "format are not supported; use the Hugging Face safetensors instead")
            self._tensors.update(part)

    def keys(self) -> set[str]:
        return set(self._tensors)

    def get(self, key: str) -> Tensor:
        return self._tensors[key]


def _open_source(checkpoint_dir: Path) -> _SafetensorsSource | _TorchSource:
    if list(checkpoint_dir.glob("*.safetensors")):
        return _SafetensorsSource(checkpoint_dir)
    consolidated = sorted(checkpoint_dir.glob("consolidated.*.pt")) + sorted(
        checkpoint_dir.glob("consolidated.*.pth"))
    if consolidated:
        return _TorchSource(consolidated)
    raise CheckpointError(
        f"no weights in {checkpoint_dir}: expected *.safetensors (Hugging Face) or consolidated.*.pt "
        "(Mistral); download them with scripts/download.py --repo-id <repo>")


# ---------------------------------------------------------------------------------------------------
# Name mapping: for each of our parameters, how to build it from the source's tensors.


def _half_split_rope(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k rows from interleaved rotary pairs (Mistral's layout) to the half-split layout."""
    head_dim = weight.shape[0] // n_heads
    return weight.view(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


class _HfMapping:
    """Hugging Face Mixtral names (per-expert `block_sparse_moe.experts.j` or transformers 5 `mlp.experts`)."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys
        self.fused_experts = any(".mlp.experts.gate_up_proj" in key for key in keys)

    def build(self, name: str, args: ModelArgs, get: Callable[[str], Tensor]) -> Tensor:
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if match is None:
            if name == "output.weight" and args.tie_word_embeddings and "lm_head.weight" not in self.keys:
                # Tied embeddings. (A tied config whose checkpoint holds an lm_head of its own: transformers
                # 5 keeps that lm_head, and so do we. Untied, a missing lm_head is an incomplete checkpoint.)
                return get("model.embed_tokens.weight")
            return get({"tok_embeddings.weight": "model.embed_tokens.weight",
                        "norm.weight": "model.norm.weight",
                        "output.weight": "lm_head.weight"}[name])
        prefix, rest = f"model.layers.{match[1]}.", match[2]
        if rest == "attention.wqkv.weight":
            return torch.cat([get(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv"])
        simple = {"attention.wo.weight": "self_attn.o_proj.weight",
                  "attention_norm.weight": "input_layernorm.weight",
                  "ffn_norm.weight": "post_attention_layernorm.weight"}
        if rest in simple:
            return get(prefix + simple[rest])
        moe = "mlp" if self.fused_experts else "block_sparse_moe"
        if rest == "block_sparse_moe.gate.weight":
            gate = f"{prefix}{moe}.gate.weight"
            return get(gate if gate in self.keys else f"{prefix}mlp.gate.weight")
        which = rest.rsplit(".", 1)[1]  # w1 (gate), w2 (down), w3 (up)
        if self.fused_experts:
            if which == "w2":
                return get(f"{prefix}mlp.experts.down_proj")
            gate_up = get(f"{prefix}mlp.experts.gate_up_proj")
            return gate_up.chunk(2, dim=1)[0 if which == "w1" else 1]
        return torch.stack([get(f"{prefix}block_sparse_moe.experts.{e}.{which}.weight")
                            for e in range(args.num_experts)])


class _MistralMapping:
    """Mistral's original names: `attention.wq`, `block_sparse_moe.w1` stacked or `feed_forward.experts.j`."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys

    def build(self, name: str, args: ModelArgs, get: Callable[[str], Tensor]) -> Tensor:
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if match is None:
            return get(name)
        prefix, rest = f"layers.{match[1]}.", match[2]
        if rest == "attention.wqkv.weight":
            q = _half_split_rope(get(prefix + "attention.wq.weight"), args.n_heads)
            k = _half_split_rope(get(prefix + "attention.wk.weight"), args.n_kv_heads)
            return torch.cat([q, k, get(prefix + "attention.wv.weight")])
        if rest == "block_sparse_moe.gate.weight":
            gate = prefix + "block_sparse_moe.gate.weight"
            return get(gate if gate in self.keys else prefix + "feed_forward.gate.weight")
        if not rest.startswith("block_sparse_moe.cond_ffn."):
            return get(prefix + rest)
        which = rest.rsplit(".", 1)[1]
        stacked = f"{prefix}block_sparse_moe.{which}"
        if stacked in self.keys:  # [E * I, D] for all of w1, w2, w3
            experts = get(stacked).reshape(args.num_experts, args.intermediate_size, args.dim)
            return experts.transpose(1, 2) if which == "w2" else experts
        return torch.stack([get(f"{prefix}feed_forward.experts.{e}.{which}.weight")
                            for e in range(args.num_experts)])


# ---------------------------------------------------------------------------------------------------
# Writing a state dict in place, one tensor at a time.


def write_streaming(path: Path, layout: dict[str, tuple[torch.Size, torch.dtype]],
                    tensors: Iterator[tuple[str, Tensor]]) -> Path:
    """Save a state dict whose layout is known up front, holding one produced tensor in memory at a time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with FakeTensorMode():
        skeleton = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()}
    try:
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, partial)
        del skeleton
        written: set[str] = set()
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            target = torch.load(partial, mmap=True, weights_only=True)
        for name, tensor in tensors:
            if name not in target or name in written:
                raise CheckpointError(f"internal error: unexpected or repeated tensor {name}")
            target[name].copy_(tensor)
            written.add(name)
        del target
        if written != layout.keys():
            raise CheckpointError(f"internal error: {len(layout) - len(written)} tensors were never written")
        partial.replace(path)  # only a complete file ever carries the final name
    except BaseException:
        partial.unlink(missing_ok=True)  # a half-written file can be as large as the model: don't leave it
        raise
    return path


def prepare_output(path: Path, default_name: str) -> Path:
    """Check that `path` can name the output file and create its directory; CheckpointError says why not."""
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory: --output names the file to write, e.g. {path / default_name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"cannot create {path.parent} for the output ({error.strerror or error}): choose another --output "
            "in a writable directory") from error
    return path


def model_layout(model: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {name: (tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items()}


def meta_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def convert_checkpoint(checkpoint_dir: str | Path, output_path: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> Path:
    """Convert a Hugging Face or Mistral Mixtral checkpoint directory to our `model.pth`.

    The dtype defaults to the source's (bf16 for the released models). `config.json` and
    `tokenizer.model` end up next to the output.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"{checkpoint_dir} is not a directory; download a checkpoint there first")
    args = load_model_args(checkpoint_dir)
    source = _open_source(checkpoint_dir)
    keys = source.keys()
    mapping = (_HfMapping(keys) if any(key.startswith("model.") for key in keys)
               else _MistralMapping(keys))
    _check_layer_count(checkpoint_dir, keys, args)
    if dtype is None:
        dtype = _source_dtype(source, keys)
    output_path = prepare_output(Path(output_path) if output_path else checkpoint_dir / OUR_CHECKPOINT,
                                 OUR_CHECKPOINT)
    expected = {name: (shape, dtype) for name, (shape, _) in model_layout(meta_model(args)).items()}

    def get(key: str) -> Tensor:
        if key not in keys:
            raise CheckpointError(
                f"{checkpoint_dir} has no tensor {key}: the checkpoint is incomplete or not a Mixtral model")
        tensor = source.get(key)
        _check_unquantized(key, tensor)
        return tensor

    def produce() -> Iterator[tuple[str, Tensor]]:
        for name, (shape, _) in expected.items():
            tensor = mapping.build(name, args, get)
            if tensor.shape != shape:
                raise CheckpointError(
                    f"{name}: the checkpoint has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(shape)}; the config does not belong to these weights")
            yield name, tensor.to(dtype)

    write_streaming(output_path, expected, produce())
    _copy_beside(checkpoint_dir, output_path.parent, args)
    return output_path


def _check_layer_count(checkpoint_dir: Path, keys: set[str], args: ModelArgs) -> None:
    """Refuse weights with more layers than the config: the extra layers would be dropped without a word
    (fewer layers surface as a missing tensor)."""
    layers = {int(match[1]) for key in keys if (match := re.match(r"(?:model\.)?layers\.(\d+)\.", key))}
    found = max(layers) + 1 if layers else 0
    if found > args.n_layers:
        config = ("config.json has num_hidden_layers" if (checkpoint_dir / "config.json").is_file()
                  else "params.json has n_layers")
        raise CheckpointError(
            f"{checkpoint_dir} holds {found} layers but {config} {args.n_layers}: the config does not belong "
            "to these weights; put the checkpoint's own config beside them")


UNQUANTIZED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_unquantized(key: str, tensor: Tensor) -> None:
    """Refuse weights stored quantized (float8, int8, packed ints): cast to float without their scales,
    they would make a model of garbage."""
    if tensor.dtype not in UNQUANTIZED_DTYPES:
        raise CheckpointError(
            f"{key} is stored as {str(tensor.dtype).removeprefix('torch.')}: this checkpoint is quantized, and "
            "the converter reads unquantized weights (bfloat16, float16 or float32) only; download the "
            "unquantized release and make int8 weights with scripts/quantize.py")


def _source_dtype(source: _SafetensorsSource | _TorchSource, keys: set[str]) -> torch.dtype:
    for key in ("model.embed_tokens.weight", "tok_embeddings.weight"):
        if key in keys:
            tensor = source.get(key)
            _check_unquantized(key, tensor)
            return tensor.dtype
    return torch.bfloat16


def _copy_beside(checkpoint_dir: Path, out_dir: Path, args: ModelArgs) -> None:
    """Put config.json, tokenizer.model and generation_config.json beside the output. Into another
    directory they are always written: what a model converted there before left must not stay beside
    this one."""
    in_place = out_dir.resolve() == checkpoint_dir.resolve()
    config = out_dir / "config.json"
    if not (in_place and config.exists()):
        _replace_file(config, json.dumps(args.to_hf_config(), indent=2).encode())
    if in_place:
        return
    for name in ("tokenizer.model", "generation_config.json"):
        source = checkpoint_dir / name
        if source.is_file():
            _replace_file(out_dir / name, source.read_bytes())


def _replace_file(path: Path, data: bytes) -> None:
    """Write `path` anew (a hard link to another file, as scripts/build_archive.py makes, is replaced,
    not written through)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


# ---------------------------------------------------------------------------------------------------
# Loading.


def check_checkpoint_path(checkpoint_path: Path) -> None:
    """CheckpointError unless `checkpoint_path` is a file (a directory is named as one)."""
    if checkpoint_path.is_dir():
        raise CheckpointError(
            f"{checkpoint_path} is a directory: pass the checkpoint file in it, e.g. "
            f"{checkpoint_path / OUR_CHECKPOINT}")
    if not checkpoint_path.is_file():
        raise CheckpointError(
            f"{checkpoint_path} does not exist: convert a checkpoint with scripts/convert_hf_checkpoint.py")


def read_state_dict(checkpoint_path: Path) -> dict[str, Tensor]:
    """Our checkpoint's state dict, memory-mapped; CheckpointError when it is missing, damaged or foreign."""
    check_checkpoint_path(checkpoint_path)
    try:
        state_dict = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
        if not isinstance(state_dict, dict) or not all(isinstance(t, Tensor) for t in state_dict.values()):
            raise CheckpointError(f"it holds a {type(state_dict).__name__}, not a state dict")
    except Exception as error:  # a truncated file surfaces as a zip, pickle or OS error
        raise CheckpointError(
            f"cannot read {checkpoint_path} ({error}): it is damaged or not a checkpoint of this engine; convert "
            "again with scripts/convert_hf_checkpoint.py (and scripts/quantize.py for int8)") from error
    return state_dict


def is_int8_state_dict(state_dict: dict[str, Tensor]) -> bool:
    return any(tensor.dtype == torch.int8 for tensor in state_dict.values())


def load_model(checkpoint_path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16,
               transform: Callable[[Transformer], Transformer] | None = None) -> Transformer:
    """Load our checkpoint (bf16/float or int8, told apart by its contents) onto `device`.

    `config.json` is read from the checkpoint's directory. `transform` runs on the loaded model
    before it moves to the device (tensor parallelism shards there, so each rank copies only its part).
    """
    from gpt_fast_mixtral.quantize import quantize_int8

    checkpoint_path = Path(checkpoint_path)
    state_dict = read_state_dict(checkpoint_path)  # memory-mapped; says what is wrong before the config is looked for
    args = load_model_args(checkpoint_path.parent)
    model = meta_model(args)
    if is_int8_state_dict(state_dict):
        model = quantize_int8(model)
    try:
        model.load_state_dict(state_dict, assign=True, strict=True)
    except RuntimeError as error:
        raise CheckpointError(_mismatch(checkpoint_path, state_dict, model, error)) from error
    if transform is not None:
        model = transform(model)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _mismatch(checkpoint_path: Path, state_dict: dict[str, Tensor], model: Transformer, error: Exception) -> str:
    """Why a state dict does not load, in one line (PyTorch's message names every key: hundreds for Mixtral)."""
    if any(key.startswith(("model.layers.", "model.embed_tokens.")) for key in state_dict):
        return (f"{checkpoint_path} is a Hugging Face checkpoint file, not one converted for this engine: run "
                f"scripts/convert_hf_checkpoint.py --checkpoint-dir {checkpoint_path.parent} and pass the "
                "model.pth it writes (or the model_int8.pth of scripts/quantize.py)")
    expected = model.state_dict()

    def examples(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(state_dict) if expected[key].shape != state_dict[key].shape)
    problems = [f"{len(names)} {what} ({examples(names)})"
                for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
    if reshaped:
        key = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {key}: {list(state_dict[key].shape)} in the "
                        f"checkpoint, {list(expected[key].shape)} for the config)")
    details = "; ".join(problems) or str(error)
    return (f"{checkpoint_path} does not match {checkpoint_path.parent / 'config.json'}: {details}; convert the "
            "checkpoint again, or put the config.json it was converted with beside it")
