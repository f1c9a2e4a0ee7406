#!/usr/bin/env bash
# Single-GPU, tensor-parallel and expert-parallel decode benchmarks (random Mixtral-8x7B), in one call on the
# GPU machine:
#
#     bash benchmarks/run_parallel.sh OUTDIR NGPUS PRECISION...      e.g.  bash benchmarks/run_parallel.sh "$OUT" 2 int8
#
# For each precision: the single-GPU run (OUTDIR/<precision>_single.json), then tp and ep over NGPUS GPUs
# (OUTDIR/<precision>_tp<N>.json, OUTDIR/<precision>_ep<N>.json) with the single run as --baseline-json;
# at the end a table. Every command's output goes to OUTDIR/run_parallel.log; the terminal gets one line
# per command (its summary, or the end of its output when it failed).
#
# Environment (all optional):
#   EXTRA_ARGS   benchmark flags for every run (default "--runs 3 --ttft-lengths 2048")
#   MODES        parallel modes to run (default "tp ep")
#   CMD_TIMEOUT  seconds one command may take (default 300)
#   BUDGET_S     seconds for the whole script (default 560): a command gets at most what is left of it,
#                less a margin for stopping, and one that cannot get 60 s is skipped
#   PYTHON       the interpreter (default python3)
#
# A cold compile takes ~80 s a run (H200, int8), so one precision (three runs) takes about 5 to 6 minutes:
# give each call of 10 minutes one precision.

set -u -o pipefail

if [ $# -lt 3 ]; then
    echo "usage: bash $0 OUTDIR NGPUS PRECISION... (precisions: int8, bf16)" >&2
    exit 2
fi
OUTDIR=$1
NGPUS=$2
shift 2
PRECISIONS=("$@")

# NVLink multicast stays off on the shared hosts (see the device notes); torchrun's ranks inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
EXTRA_ARGS=${EXTRA_ARGS:---runs 3 --ttft-lengths 2048}
MODES=${MODES:-tp ep}
CMD_TIMEOUT=${CMD_TIMEOUT:-300}
BUDGET_S=${BUDGET_S:-560}
PYTHON=${PYTHON:-python3}
STOP_MARGIN=50  # torchrun needs up to ~30 s to stop its ranks after a SIGTERM

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUTDIR"
LOG=$OUTDIR/run_parallel.log
STEP_LOG=$(mktemp /tmp/run_parallel_step.XXXXXX)
START=$SECONDS

{
    echo "== $(date -u +%FT%TZ) run_parallel.sh $OUTDIR $NGPUS ${PRECISIONS[*]}; EXTRA_ARGS=$EXTRA_ARGS"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count())'
} 2>&1 | tee "$LOG"
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$GPUS" -lt "$NGPUS" ] && [[ " $EXTRA_ARGS " != *" --device cpu "* ]]; then  # (cpu: a smoke test of this script)
    echo "error: $NGPUS GPUs asked for, $GPUS seen" | tee -a "$LOG" >&2
    exit 2
fi

# run_step NAME COMMAND...: run under timeout within the budget; append its output to the log.
run_step() {
    local name=$1
    shift
    local left=$((BUDGET_S - (SECONDS - START) - STOP_MARGIN))
    local limit=$((left < CMD_TIMEOUT ? left : CMD_TIMEOUT))
    if [ "$limit" -lt 60 ]; then
        echo "[$name] skipped: $((BUDGET_S - (SECONDS - START))) s of the budget left" | tee -a "$LOG"
        return 1
    fi
    local began=$SECONDS
    echo "== [$name] (limit ${limit} s) $*" >>"$LOG"
    # --kill-after: torchrun, stopped by SIGTERM, first stops its ranks (each in its own session).
    timeout --kill-after=45 "$limit" "$@" >"$STEP_LOG" 2>&1
    local status=$?
    cat "$STEP_LOG" >>"$LOG"
    if [ "$status" -eq 0 ]; then
        echo "[$name] $((SECONDS - began)) s: $(tail -n 1 "$STEP_LOG")"
    else
        local why="exit $status"
        [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && why="timed out after ${limit} s"
        echo "[$name] FAILED ($why) after $((SECONDS - began)) s; its errors, then its last lines:"
        grep -E '(Error|Exception|error)\b' "$STEP_LOG" | grep -v -E 'error_file|errors\.html|ChildFailedError' \
            | awk '!seen[$0]++' | head -n 8 | cut -c1-300
        echo "  ..."
        grep -v '^\s*$' "$STEP_LOG" | tail -n 6 | cut -c1-300
    fi | tee -a "$LOG"
    return "$status"
}

for precision in "${PRECISIONS[@]}"; do
    single=$OUTDIR/${precision}_single.json
    rm -f "$single"
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    run_step "$precision single" "$PYTHON" scripts/benchmark.py --precision "$precision" $EXTRA_ARGS --out "$single"
    baseline=()
    [ -s "$single" ] && baseline=(--baseline-json "$single")
    for mode in $MODES; do
        out=$OUTDIR/${precision}_${mode}${NGPUS}.json
        rm -f "$out"
        # shellcheck disable=SC2086
        run_step "$precision $mode x$NGPUS" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NGPUS" \
            scripts/benchmark.py --parallel "$mode" --precision "$precision" $EXTRA_ARGS \
            ${baseline[@]+"${baseline[@]}"} --out "$out"
    done
done
rm -f "$STEP_LOG"

echo "== $((SECONDS - START)) s in all; results in $OUTDIR" | tee -a "$LOG"
"$PYTHON" - "$OUTDIR" "$NGPUS" "$MODES" "${PRECISIONS[@]}" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import sys
from pathlib import Path

out_dir, ngpus, modes, precisions = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4:]


def cell(value, fmt="{}"):
    return "-" if value is None else fmt.format(value)


rows = [("precision", "mode", "N", "tok/s", "ceiling", "share", "speedup", "TTFT ms", "peak GB")]
for precision in precisions:
    for mode, name in [("none", "single"), *((m, f"{m}{ngpus}") for m in modes)]:
        path = out_dir / f"{precision}_{name}.json"
        if not path.is_file():
            rows.append((precision, mode, "1" if mode == "none" else ngpus, "no result (see run_parallel.log)",
                         "", "", "", "", ""))
            continue
        r = json.loads(path.read_text())
        share = r.get("share_of_ceiling")
        rows.append((precision, r.get("parallel", "none"), str(r.get("world_size", 1)), cell(r["decode_tok_s"]),
                     cell(r.get("ceiling_tok_s")), "-" if share is None else f"{100 * share:.0f}%",
                     cell(r.get("speedup_vs_single"), "{}x"), " ".join(f"{k}:{v}" for k, v in r["ttft_ms"].items()),
                     cell(r.get("peak_memory_gb"))))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
print("ceiling for N ranks: N x copy bandwidth / one rank's bytes per token; ignores all-reduce latency")
EOF
