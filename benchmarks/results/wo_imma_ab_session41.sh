#!/bin/bash
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 -c "import triton; print('triton', triton.__version__)"
if [ "${TESTS:-1}" = 1 ]; then
timeout 200 python3 -m pytest -q -x -p no:logging tests/test_kernels.py -k "preloaded or int8_linear" 2>&1 | tail -3
fi
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths"
for v in ${VARIANTS:-mma1 imma1 mma2 imma2}; do
  VARIANT=${v%[0-9]} PYTHONFAULTHANDLER=1 timeout -s ABRT 150 python3 benchmarks/results/wo_imma_ab_session41.py $B --out "$OUT/r_${v}.json" > "$OUT/r_${v}.log" 2>&1
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/r_${v}.json'));t=r['decode_gpu_telemetry'];print(r['decode_tok_s_runs'], r['decode_tok_s'], t.get('power_capped_share'), t.get('sm_clock_mhz'))" 2>&1 | tail -1)"
  grep -i "preload config" "$OUT/r_${v}.log" | grep -o "gemv_preload_imma=[A-Za-z]*"
  tail -3 "$OUT/r_${v}.log" | grep -i "error\|Traceback"
done
rm -f $OUT/*.log
