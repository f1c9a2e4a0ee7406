"""Session 21 archive: needs attention_early_tiles_session21.patch applied (EARLY_TILES / HOIST_NEW are its switches). scripts/benchmark.py with the session-21 attention switches from the environment (experiment only)."""
import os
import runpy
import sys

sys.path.insert(0, ".")
from gpt_fast_mixtral.kernels import attention  # noqa: E402

attention.EARLY_TILES = int(os.environ.get("EARLY", "1"))
attention.HOIST_NEW = os.environ.get("HOIST") == "1"
attention.ATTN_WARPS = int(os.environ.get("AWARPS", "4"))
print("variant", attention.EARLY_TILES, attention.HOIST_NEW, attention.ATTN_WARPS, file=sys.stderr)
sys.argv = ["scripts/benchmark.py"] + sys.argv[1:]
runpy.run_path("scripts/benchmark.py", run_name="__main__")
