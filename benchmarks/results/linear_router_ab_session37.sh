#!/bin/bash
# Session 37 (run on the device from the repository root with linear_router_session37.patch applied to 5967e85):
# the linear router (on) against the router kernel (--no-linear-router, off), alternating processes.
# Log: h200_s37_linear_router.log; JSON h200_s37_linear_router_{v1,v2}_{off,on}{1,2}.json.
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
PYTHONFAULTHANDLER=1 timeout -s ABRT 220 python3 -m pytest -q -x tests/test_kernels.py -k "linear_route or routed or linear_router" 2>&1 | tail -15
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths --profile"
for v in off1 on1 off2 on2; do
  if [ ${v%?} = off ]; then f=--no-linear-router; else f=--linear-router; fi
  PYTHONFAULTHANDLER=1 timeout -s ABRT 200 python3 scripts/benchmark.py $B $f --out "$OUT/r_${v}.json" > "$OUT/r_${v}.log" 2>&1
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/r_${v}.json'));print(r['decode_tok_s_runs'], r['decode_tok_s'], r['decode_gpu_telemetry']['power_capped_share'], r['decode_gpu_telemetry'].get('sm_clock_mhz'))" 2>&1 | tail -1)"
  grep -A12 "critical path per" "$OUT/r_${v}.log" | tail -11
  tail -3 "$OUT/r_${v}.log"
done
