#!/bin/bash
# Session 40: alternating benchmark processes of the code before (old: 16-warp router, no prefetch of the attention
# chunk), the router alone, the prefetch alone, and both (new). Run from the repository root on the device; results
# in $OUT. Calls 1 and 3 of h200_s40_router_attention.log set the same constants (router warps 4 / 8 / 16 are
# SINGLE_PASS_THREAD_BYTES 512 / 256 / 128).
cat > /tmp/bench_s40.py <<'PY'
import os, runpy, sys
sys.path.insert(0, ".")
from gpt_fast_mixtral.kernels import attention, router
v = os.environ.get("VARIANT", "new")
if v in ("old", "attention"):
    router.SINGLE_PASS_THREAD_BYTES = 128
if v in ("old", "router"):
    attention.PREFETCH_CHUNK = False
sys.argv = ["scripts/benchmark.py"] + sys.argv[1:]
runpy.run_path("scripts/benchmark.py", run_name="__main__")
PY
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths"
for v in ${VARIANTS:-old1 new1 old2 new2}; do
  VARIANT=${v%[0-9]} PYTHONFAULTHANDLER=1 timeout -s ABRT 150 python3 /tmp/bench_s40.py $B --out "$OUT/r_${v}.json" > "$OUT/r_${v}.log" 2>&1
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/r_${v}.json'));t=r['decode_gpu_telemetry'];print(r['decode_tok_s_runs'], r['decode_tok_s'], t.get('power_capped_share'), t.get('sm_clock_mhz'))" 2>&1 | tail -1)"
done
