"""Session 41 A/B: VARIANT=mma (wo's bf16 tensor-core kernel) or imma (int8 tensor cores, x in fixed point)."""
import dataclasses, os, runpy, sys
sys.path.insert(0, ".")
from gpt_fast_mixtral.kernels import linear
from gpt_fast_mixtral import quantize
v = os.environ.get("VARIANT", "imma")
quantize.WeightOnlyInt8Linear.preload_config = dataclasses.replace(linear.PRELOAD_CONFIG, gemv_preload_imma=(v == "imma"))
print("preload config", quantize.WeightOnlyInt8Linear.preload_config)
sys.argv = ["scripts/benchmark.py"] + sys.argv[1:]
runpy.run_path("scripts/benchmark.py", run_name="__main__")
