"""Convert a downloaded Hugging Face (or Mistral original) Mixtral checkpoint to our model.pth."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gpt_fast_mixtral.checkpoint import convert_checkpoint  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-dir", type=Path, required=True,
                        help="directory with config.json (or params.json), weights and tokenizer.model")
    parser.add_argument("--output", type=Path, default=None, help="default: CHECKPOINT_DIR/model.pth")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: the checkpoint's own dtype")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        path = convert_checkpoint(args.checkpoint_dir, args.output, DTYPES.get(args.dtype))
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size_gb = path.stat().st_size / 1e9
    print(f"wrote {path} ({size_gb:.2f} GB) in {time.perf_counter() - start:.1f} s")
    if not (path.parent / "tokenizer.model").is_file():
        print(f"warning: no tokenizer.model in {args.checkpoint_dir}, so none beside {path}: serving needs it; "
              f"copy the model's tokenizer.model into {path.parent} (scripts/download.py --repo-id <repo> fetches "
              "it with the weights)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
