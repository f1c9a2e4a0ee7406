"""Build a TorchServe model directory (no-archive format) from a converted checkpoint directory.

    python scripts/build_archive.py --checkpoint-dir checkpoints/mistralai/Mixtral-8x7B-v0.1 \
        --config-file model_config.yaml --model-name mixtral --model-store model_store

What it does, step by step (the README lists the same steps as plain shell commands):
1. runs `torch-model-archiver --archive-format no-archive` with handler/mixtral_handler.py, the config
   file, and the `gpt_fast_mixtral` and `handler` packages as extra files, so the worker needs nothing
   installed but torch, sentencepiece and TorchServe;
2. puts the checkpoint named by the config's `handler.converted_ckpt_dir` (plus config.json,
   tokenizer.model, generation_config.json) at that path inside the model directory: hard links when
   the model store is on the same file system (no copy of a 47 GB file), copies otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CARRIED_PACKAGES = ("gpt_fast_mixtral", "handler")
BESIDE_CHECKPOINT = ("config.json", "tokenizer.model", "generation_config.json")  # the last is optional


class ArchiveError(RuntimeError):
    pass


def checkpoint_target(config_file: Path) -> Path:
    """The checkpoint's path inside the model directory, as the config's handler section names it."""
    config = yaml.safe_load(config_file.read_text()) or {}
    target = (config.get("handler") or {}).get("converted_ckpt_dir")
    if not isinstance(target, str) or not target:
        raise ArchiveError(f"{config_file} has no handler.converted_ckpt_dir (the checkpoint file, relative "
                           "to the model directory)")
    path = Path(target)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"handler.converted_ckpt_dir in {config_file} must be a relative path inside the "
                           f"model directory, got {target!r}")
    return path


def run_archiver(model_name: str, version: str, config_file: Path, model_store: Path, force: bool) -> Path:
    archiver = shutil.which("torch-model-archiver")
    command = [archiver] if archiver else [sys.executable, "-m", "model_archiver.model_packaging"]
    with tempfile.TemporaryDirectory(prefix="archive-extra-") as staging:
        # --extra-files copies a directory's contents, not the directory: stage the packages one level
        # down so they arrive as packages.
        for package in CARRIED_PACKAGES:
            shutil.copytree(REPO_ROOT / package, Path(staging) / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        command += ["--model-name", model_name, "--version", version,
                    "--handler", str(REPO_ROOT / "handler" / "mixtral_handler.py"),
                    "--config-file", str(config_file), "--extra-files", staging,
                    "--archive-format", "no-archive", "--export-path", str(model_store)]
        if force:
            command.append("--force")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ArchiveError(
            f"torch-model-archiver failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return model_store / model_name


def checkpoint_files(checkpoint_dir: Path, checkpoint_name: str) -> list[Path]:
    """The checkpoint and the files the engine reads beside it; ArchiveError says what is missing."""
    source = checkpoint_dir / checkpoint_name
    if not source.is_file():
        found = ", ".join(sorted(p.name for p in checkpoint_dir.glob("*.pth"))) or "none"
        raise ArchiveError(f"{source} does not exist (the config's handler.converted_ckpt_dir names "
                           f"{checkpoint_name}; .pth files in {checkpoint_dir}: {found}). Convert with "
                           "scripts/convert_hf_checkpoint.py and, for model_int8.pth, scripts/quantize.py")
    files = [source]
    for name in BESIDE_CHECKPOINT:
        path = checkpoint_dir / name
        if path.is_file():
            files.append(path)
        elif name != "generation_config.json":
            raise ArchiveError(f"{path} is missing: the engine reads it from beside the checkpoint; copy the model's "
                               f"{name} there (scripts/convert_hf_checkpoint.py does, from the downloaded checkpoint)")
    return files


def place_checkpoint(files: list[Path], target_dir: Path) -> None:
    """Hard-link the files into target_dir (no copy of a 47 GB file); copy across file systems."""
    target_dir.mkdir(parents=True, exist_ok=True)
    for src in files:
        dst = target_dir / src.name
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)


def build_archive(checkpoint_dir: Path, config_file: Path, model_name: str, model_store: Path,
                  version: str = "1.0", force: bool = False) -> Path:
    target = checkpoint_target(config_file)
    files = checkpoint_files(checkpoint_dir, target.name)  # fail before the archiver writes anything
    if (model_store / model_name).exists() and not force:
        raise ArchiveError(f"{model_store / model_name} exists already; pass --force to replace it")
    model_store.mkdir(parents=True, exist_ok=True)
    model_dir = run_archiver(model_name, version, config_file, model_store, force)
    place_checkpoint(files, model_dir / target.parent)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, required=True,
                        help="directory with model.pth / model_int8.pth, config.json and tokenizer.model")
    parser.add_argument("--config-file", type=Path, default=REPO_ROOT / "model_config.yaml",
                        help="TorchServe model config (default: model_config.yaml)")
    parser.add_argument("--model-name", default="mixtral")
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory")
    args = parser.parse_args(argv)
    try:
        model_dir = build_archive(args.checkpoint_dir, args.config_file, args.model_name, args.model_store,
                                  args.version, args.force)
    except (ArchiveError, OSError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"built model directory {model_dir}; serve it with:\n"
          f"  torchserve --start --ncs --model-store {args.model_store} --models {args.model_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
