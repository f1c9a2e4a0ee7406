set -u
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
A="--batch-size 1 --runs 3"
P=$OUT/h200x2_s30f
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
TP="python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/benchmark.py --parallel tp $A"
s() { CUDA_VISIBLE_DEVICES=0 timeout 150 python3 scripts/benchmark.py --precision int8 $A --ttft-lengths 2048 --out ${P}_int8_single$1.json > ${P}_int8_single$1.log 2>&1; echo "int8 single$1: $(tail -1 ${P}_int8_single$1.log)"
  python3 -c "import json; r=json.load(open('${P}_int8_single$1.json')); print('   runs', r['decode_tok_s_runs'])"; }
r() { local name=$1; shift; timeout 170 $TP --precision int8 --ttft-lengths 2048 --baseline-json ${P}_int8_single.json "$@" --out ${P}_$name.json > ${P}_$name.log 2>&1
  echo "$name: $(tail -1 ${P}_$name.log)"; grep -i "error\|Traceback" ${P}_$name.log | head -3
  python3 -c "import json; r=json.load(open('${P}_$name.json')); print('   runs', r['decode_tok_s_runs'], [(t['windows'][-1]['power_w'], t['windows'][-1]['sm_clock_mhz']) for t in r.get('decode_gpu_telemetry_ranks') or [] if t and t.get('windows')])"; }
s ""
r int8_tp2
r int8_tp2_b
s "_b"
