#!/bin/bash
# Session 35 archive (run on the device from the repository root): the generate loop of a557d86 (old, from
# `mkdir -p .devtmp/old && git archive a557d86 gpt_fast_mixtral scripts | tar -x -C .devtmp/old`) against
# session 35's loop (new) and session 35's loop with the host copy on the main stream (newmain), each in its
# own process; loop_boundary_session35.py prints what runs between two steps' graphs. Log: h200_s35_loop_ab.log.
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths --profile"
for v in old new newmain; do
  if [ $v = old ]; then d=.devtmp/old; else d=.; fi
  if [ $v = newmain ]; then export S35_MAIN_D2H=1; fi
  (cd $d && python3 "$OLDPWD/benchmarks/results/loop_boundary_session35.py" $B --out "$OUT/p_${v}.json" > "$OUT/p_${v}.log" 2>&1)
  echo "== $v: $(python3 -c "import json;r=json.load(open('$OUT/p_${v}.json'));print(r['decode_tok_s_runs'], r['decode_tok_s'], r['decode_gpu_telemetry']['power_capped_share'])")"
  grep -A16 "critical path per step" "$OUT/p_${v}.log"
done
