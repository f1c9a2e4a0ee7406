"""Write a tiny Mixtral-shaped Hugging Face checkpoint (random weights, trained tokenizer) to --out."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from gpt_fast_mixtral.tiny_model import TINY_DEFAULTS, TINY_VOCAB_SIZE, make_tiny_model  # noqa: E402

# CLI flag -> ModelArgs field; flags left unset keep the tiny defaults.
_SHAPE_FLAGS = {
    "dim": "dim",
    "layers": "n_layers",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "sliding_window": "sliding_window",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    for flag, field in _SHAPE_FLAGS.items():
        default = TINY_VOCAB_SIZE if field == "vocab_size" else TINY_DEFAULTS[field]
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None,
                            help=f"{field} (default {default})")
    args = parser.parse_args(argv)
    overrides = {field: getattr(args, flag) for flag, field in _SHAPE_FLAGS.items()
                 if getattr(args, flag) is not None}
    try:
        out_dir = make_tiny_model(args.out, seed=args.seed, dtype=args.dtype, **overrides)
    except ValueError as error:  # ConfigError and bad vocab sizes: a message, not a traceback
        parser.error(str(error))
    files = ", ".join(sorted(path.name for path in out_dir.iterdir()))
    print(f"wrote tiny Mixtral checkpoint to {out_dir.resolve()} ({files})")


if __name__ == "__main__":
    main()
