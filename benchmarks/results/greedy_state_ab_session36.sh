#!/bin/bash
# Session 36 (run on the device from the repository root): the decode step ending in kernels.argmax.greedy_state
# (new) against e1d33e0's Inductor argmax + position kernel (old, from
# `mkdir -p .devtmp/old && git archive e1d33e0 gpt_fast_mixtral scripts | tar -x -C .devtmp/old`), each run in
# its own process, alternating: old new old new. Log: h200_s36_greedy_state_ab.log.
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths --profile"
for v in old1 new1 old2 new2; do
  if [ ${v%?} = old ]; then d=.devtmp/old; else d=.; fi
  (cd $d && PYTHONFAULTHANDLER=1 timeout -s ABRT 240 python3 scripts/benchmark.py $B --out "$OUT/g_${v}.json" > "$OUT/g_${v}.log" 2>&1)
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/g_${v}.json'));print(r['decode_tok_s_runs'], r['decode_tok_s'], r['decode_gpu_telemetry']['power_capped_share'], r['decode_gpu_telemetry'].get('sm_clock_mhz'))" 2>&1 | tail -1)"
  grep -A12 "critical path per" "$OUT/g_${v}.log" | tail -11
  grep -i "argmax\|greedy\|add_clamp\|Memcpy" "$OUT/g_${v}.log" | head -6
done
