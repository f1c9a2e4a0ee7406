#!/usr/bin/env bash
# Serve the tiny demo model with TorchServe on this machine (CPU is enough) and send it request.json.
#
#   bash scripts/serve_demo.sh
#
# Installs what is missing (Java 17, torch 2.13 CPU, this package with TorchServe), builds a tiny
# random-weight Mixtral, converts and int8-quantizes it, builds the model directory with
# torch-model-archiver, starts TorchServe (token authorization on, as TorchServe 0.12 ships it), waits
# for the model, sends request.json and prints the answer. Everything lives in build/demo/.
# The weights are random: the answer is gibberish, but every step is the one the real model takes.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
DEMO=$REPO/build/demo
MODEL=tiny-mixtral
PYTHON=${PYTHON:-python3}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------------------------------------------
step "Checking prerequisites"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.10 or newer"
if ! command -v java >/dev/null; then
    echo "Java (TorchServe's frontend) is missing: installing openjdk-17-jre-headless"
    as_root apt-get update -q && as_root apt-get install -y -q openjdk-17-jre-headless
fi
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "torch is missing: installing torch==2.13.0 (CPU build)"
    "$PYTHON" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi
if ! "$PYTHON" -c 'import ts, model_archiver, sentencepiece, safetensors, yaml, gpt_fast_mixtral' \
        2>/dev/null; then
    echo "installing this package with TorchServe (pip install -e '.[serve]')"
    "$PYTHON" -m pip install -q -e ".[serve]"
fi

# A previous run of this demo may still be serving: stop it (and only it) before starting again.
PID_FILE=${TMPDIR:-/tmp}/.model_server.pid
if [ -f "$PID_FILE" ] && tr '\0' ' ' <"/proc/$(cat "$PID_FILE")/cmdline" 2>/dev/null | grep -qF "$DEMO/"; then
    step "Stopping the previous demo TorchServe"
    (cd "$DEMO" && torchserve --stop) || true
    sleep 3
fi

# ---------------------------------------------------------------------------------------------------
step "Building the tiny model: make -> convert -> quantize (int8)"
rm -rf "$DEMO/checkpoint" "$DEMO/model_store" "$DEMO/logs"
mkdir -p "$DEMO"
"$PYTHON" scripts/make_tiny_model.py --out "$DEMO/checkpoint"
"$PYTHON" scripts/convert_hf_checkpoint.py --checkpoint-dir "$DEMO/checkpoint"
"$PYTHON" scripts/quantize.py --checkpoint-path "$DEMO/checkpoint/model.pth" --mode int8

step "Building the model directory with torch-model-archiver (CPU variant of model_config.yaml)"
cat >"$DEMO/model_config.yaml" <<'EOF'
# model_config.yaml for the CPU: same handler settings as the GPU one, minus compile.
minWorkers: 1
maxWorkers: 1
batchSize: 4
maxBatchDelay: 50
responseTimeout: 120
deviceType: "cpu"
handler:
    converted_ckpt_dir: "checkpoints/tiny-mixtral/model_int8.pth"
    max_new_tokens: 50
    stream: false
    max_seq_len: 512
    compile: false
    fx_graph_cache: true
EOF
"$PYTHON" scripts/build_archive.py --checkpoint-dir "$DEMO/checkpoint" --config-file "$DEMO/model_config.yaml" \
    --model-name "$MODEL" --model-store "$DEMO/model_store"

# ---------------------------------------------------------------------------------------------------
# TorchServe's default ports, or free ones when something else holds them.
pick_port() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
want = int(sys.argv[1])
with socket.socket() as sock:
    try:
        sock.bind(("127.0.0.1", want))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1])
EOF
}
INFERENCE_PORT=$(pick_port 8080)
MANAGEMENT_PORT=$(pick_port 8081)
METRICS_PORT=$(pick_port 8082)
cat >"$DEMO/config.properties" <<EOF
inference_address=http://127.0.0.1:$INFERENCE_PORT
management_address=http://127.0.0.1:$MANAGEMENT_PORT
metrics_address=http://127.0.0.1:$METRICS_PORT
# The handler's own metrics (tokens, time to first token, decode speed) on the metrics endpoint:
metrics_mode=prometheus
model_metrics_auto_detect=true
EOF

step "Starting TorchServe (logs in $DEMO/logs)"
cd "$DEMO"  # TorchServe writes key_file.json (the API tokens) into its working directory
export LOG_LOCATION=$DEMO/logs METRICS_LOCATION=$DEMO/logs
# Absolute paths: they mark this TorchServe's command line as the demo's (see the restart check above).
torchserve --start --ncs --ts-config "$DEMO/config.properties" --model-store "$DEMO/model_store" \
    --models "$MODEL=$MODEL" >"$DEMO/torchserve.out" 2>&1 \
    || { cat "$DEMO/torchserve.out"; die "torchserve --start failed"; }

key() { "$PYTHON" -c "import json, sys; print(json.load(open('key_file.json'))[sys.argv[1]]['key'])" "$1"; }
deadline=$((SECONDS + READY_TIMEOUT_S))
until [ -f key_file.json ] && curl -sf -H "Authorization: Bearer $(key management)" \
        "http://127.0.0.1:$MANAGEMENT_PORT/models/$MODEL" 2>/dev/null | grep -q '"READY"'; do
    if [ $SECONDS -ge $deadline ]; then
        tail -n 40 "$DEMO/logs/model_log.log" "$DEMO/logs/ts_log.log" 2>/dev/null || cat "$DEMO/torchserve.out"
        die "the model was not ready after ${READY_TIMEOUT_S}s (logs above);" \
            "stop TorchServe with: cd $DEMO && torchserve --stop"
    fi
    sleep 1
done
INFERENCE_KEY=$(key inference)

step "curl -T request.json ($(cat "$REPO/request.json"))"
ANSWER=$(curl -sS --max-time 120 -H "Authorization: Bearer $INFERENCE_KEY" \
    "http://127.0.0.1:$INFERENCE_PORT/predictions/$MODEL" -T "$REPO/request.json")
printf 'Answer: %s\n' "$ANSWER"

cat <<EOF

TorchServe is serving $MODEL at http://127.0.0.1:$INFERENCE_PORT (random weights: the text is gibberish).
  Ask again:  curl -H "Authorization: Bearer $INFERENCE_KEY" http://127.0.0.1:$INFERENCE_PORT/predictions/$MODEL -T request.json
  Stream:     curl -N -H "Authorization: Bearer $INFERENCE_KEY" -H "Content-Type: application/json" \\
                http://127.0.0.1:$INFERENCE_PORT/predictions/$MODEL -d '{"prompt": "The capital of France", "stream": true}'
  Metrics:    curl http://127.0.0.1:$METRICS_PORT/metrics
  Keys:       $DEMO/key_file.json
  Logs:       $DEMO/logs/
  Stop it:    cd $DEMO && torchserve --stop
EOF
