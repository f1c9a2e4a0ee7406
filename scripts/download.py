"""Download a Mixtral checkpoint from the Hugging Face Hub.

    python scripts/download.py --repo-id mistralai/Mixtral-8x7B-v0.1 [--checkpoint-dir DIR] [--hf-token T]
"""

import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from gpt_fast_mixtral.download import DownloadError, default_checkpoint_dir, download  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo-id", required=True, help="Hub repo, e.g. mistralai/Mixtral-8x7B-v0.1")
    parser.add_argument("--checkpoint-dir", type=Path, help="target (default: checkpoints/<repo-id>)")
    parser.add_argument(
        "--hf-token", default=os.environ.get("HF_TOKEN"), help="token for gated repos (default: $HF_TOKEN)"
    )
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    args = parser.parse_args(argv)

    # Our progress notes at INFO; libraries only from WARNING, or httpx logs every request.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gpt_fast_mixtral").setLevel(logging.INFO)
    checkpoint_dir = args.checkpoint_dir or default_checkpoint_dir(args.repo_id)
    try:
        download(args.repo_id, checkpoint_dir, args.hf_token or None, revision=args.revision)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to continue (finished files stay in the Hugging Face "
            "cache)",
            file=sys.stderr,
        )
        return 130
    print(checkpoint_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
