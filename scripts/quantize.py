"""Quantize our model.pth to int8 weight-only (model_int8.pth next to it)."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_fast_mixtral.quantize import quantize_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint-path", type=Path, required=True, help="model.pth from convert")
    parser.add_argument("--mode", choices=["int8"], default="int8")
    parser.add_argument("--output", type=Path, default=None, help="default: model_int8.pth beside the input")
    parser.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        path = quantize_checkpoint(args.checkpoint_path, args.mode, args.output, args.device)
    except (ValueError, OSError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
