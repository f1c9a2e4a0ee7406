#!/bin/bash
# Session 39: wo (preloaded int8 linear) on tensor cores (gemv_preload_mma=1) against the CUDA-core kernel.
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
if [ "${TESTS:-1}" = 1 ]; then
PYTHONFAULTHANDLER=1 timeout -s ABRT 240 python3 -m pytest -q -x tests/test_kernels.py -k "preloaded" 2>&1 | tail -4
fi
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths ${PROFILE---profile}"
for v in ${VARIANTS:-base1 mma1 base2 mma2}; do
  f="--linear-config gemv_preload_mma=0"
  case $v in mma*) f="--linear-config gemv_preload_mma=1";; m512*) f="--linear-config gemv_preload_mma=1 gemv_preload_mma_block_k=512";; m1k*) f="--linear-config gemv_preload_mma=1 gemv_preload_mma_block_k=1024";; m256*) f="--linear-config gemv_preload_mma=1 gemv_preload_mma_block_k=256";; esac
  PYTHONFAULTHANDLER=1 timeout -s ABRT 150 python3 scripts/benchmark.py $B $f --out "$OUT/r_${v}.json" > "$OUT/r_${v}.log" 2>&1
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/r_${v}.json'));t=r['decode_gpu_telemetry'];print(r['decode_tok_s_runs'], r['decode_tok_s'], t.get('power_capped_share'), t.get('sm_clock_mhz'))" 2>&1 | tail -1)"
  grep -A12 "critical path per" "$OUT/r_${v}.log" | grep -E "preloaded|attention|route|gate_up_gemv|down_gemv|block_end|_linear_kernel"
done
