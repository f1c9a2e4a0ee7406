#!/bin/bash
# Session 36 (run on the device from the repository root): the next projection's weight asked of L2 between
# down's last loads and that projection's wait (MoEConfig.next_prefetch: 0 off, 1 by down's programs at their
# end, 2 by extra programs of the block-end kernel after their wait), each variant in its own process,
# alternating. Usage: bash next_prefetch_ab_session36.sh "<variants>" where a variant is NAME:SETTINGS with
# SETTINGS comma-separated MoEConfig NAME=VALUE pairs.
B="--precision int8 --batch-size 1 --runs 3 --ttft-lengths --profile"
for v in $1; do
  name=${v%%:*}; settings=${v#*:}
  PYTHONFAULTHANDLER=1 timeout -s ABRT 200 python3 scripts/benchmark.py $B --moe-config ${settings//,/ } \
    --out "$OUT/p_${name}.json" > "$OUT/p_${name}.log" 2>&1
  echo "== $name ($settings): $(python3 -c "import json;r=json.load(open('$OUT/p_${name}.json'));print(r['decode_tok_s_runs'], r['decode_tok_s'], r['decode_gpu_telemetry']['power_capped_share'])" 2>&1 | tail -1)"
  grep -A9 "critical path per" "$OUT/p_${name}.log" | tail -8
done
