#!/bin/bash
# Session 38 (run on the device from the repository root with wo_half2_session38.patch applied to 9b45595, or the
# session's earlier variants described in its header): wo with float16 products (half*, hn*, hr*) against the
# float32 kernel (base*), alternating processes; log h200_s38_wo_half2.log. orc* / nomax* used WO_ORACLE switches of
# the session's working copies (the patch does not carry them).
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
if [ "${TESTS:-1}" = 1 ]; then
PYTHONFAULTHANDLER=1 timeout -s ABRT 200 python3 -m pytest -q -x tests/test_kernels.py -k "preloaded" 2>&1 | tail -4
fi
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths --profile"
for v in ${VARIANTS:-base1 half1 orc1 base2 half2 orc2}; do
  f=""; e=""
  case $v in half*) f="--linear-config gemv_preload_half2=1";; hr*) f="--linear-config gemv_preload_half2=1 gemv_preload_maxnreg=168";; hn*) f="--linear-config gemv_preload_half2=1";; nomax*) f="--linear-config gemv_preload_half2=1"; e="WO_ORACLE=9";; orc*) e="WO_ORACLE=1";; esac
  env $e PYTHONFAULTHANDLER=1 timeout -s ABRT 150 python3 scripts/benchmark.py $B $f --out "$OUT/r_${v}.json" > "$OUT/r_${v}.log" 2>&1
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/r_${v}.json'));t=r['decode_gpu_telemetry'];print(r['decode_tok_s_runs'], r['decode_tok_s'], t.get('power_capped_share'), t.get('sm_clock_mhz'))" 2>&1 | tail -1)"
  grep -A9 "critical path per" "$OUT/r_${v}.log" | tail -9
done
