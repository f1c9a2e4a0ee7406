#!/usr/bin/env bash
# Measure the opt-in fast paths against the defaults on one GPU, in parts that each fit one device call:
#
#     bash benchmarks/check_fast_paths.sh OUTDIR tests     # GPU tests of every kernel path (~2 min)
#     bash benchmarks/check_fast_paths.sh OUTDIR sweeps    # kernels alone: expert gemv grids, prefill tiles, int8 linear
#     bash benchmarks/check_fast_paths.sh OUTDIR decode    # benchmark: default vs --no-fused-router, --no-fused-rope-cache
#     bash benchmarks/check_fast_paths.sh OUTDIR prefill   # benchmark: time to first token, grouped GEMM prefill
#
# Prints a table last; logs and JSON go to OUTDIR. Each part runs its commands under a time limit.
set -uo pipefail
OUT=$(realpath -m "$1"); PART=${2:-tests}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

bench() {  # name, then benchmark.py arguments
    local name=$1; shift
    timeout -k 10 "${LIMIT:-200}" python3 scripts/benchmark.py --out "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1
    echo "$name rc=$?"
}

table() {
    python3 - "$OUT" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    flags = [k for k in ("fused_router", "fused_rope_cache") if r.get(k)]
    if r.get("grouped_min_slots") is not None:
        flags.append(f"grouped>={r['grouped_min_slots']}")
    print(f"{os.path.basename(path)[:-5]:28} {r['precision']:5} {r['decode_tok_s']:7.1f} tok/s "
          f"({r['share_of_ceiling']:.0%})  ttft {r['ttft_ms']}  {' '.join(flags)}")
PY
}

case "$PART" in
tests)
    timeout -k 10 400 python3 -m pytest -q tests/test_kernels.py tests/test_gpu.py >"$OUT/tests.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/tests.log" ;;
sweeps)
    timeout -k 10 240 python3 benchmarks/sweep_moe.py --tokens 1 --precisions int8 bf16 --configs gemv \
        >"$OUT/sweep_decode.log" 2>&1; echo "decode sweep rc=$?"
    timeout -k 10 300 python3 benchmarks/sweep_moe.py --tokens 2048 --configs grouped pf_t128_i128 \
        >"$OUT/sweep_prefill.log" 2>&1; echo "prefill sweep rc=$?"
    timeout -k 10 120 python3 benchmarks/sweep_linear.py --tokens 1 >"$OUT/sweep_linear.log" 2>&1
    echo "linear sweep rc=$?"
    grep -E "^(int8|bf16) " "$OUT/sweep_decode.log" "$OUT/sweep_prefill.log"; tail -20 "$OUT/sweep_linear.log" ;;
decode)
    bench int8_default --precision int8 --runs 3 --ttft-lengths 128
    bench int8_unfused_router --precision int8 --runs 3 --ttft-lengths 128 --no-fused-router
    bench int8_unfused_rope_cache --precision int8 --runs 3 --ttft-lengths 128 --no-fused-rope-cache
    table ;;
prefill)
    bench int8_prefill_default --precision int8 --runs 1 --new-tokens 20 --ttft-lengths 512 2048 8192
    bench int8_prefill_tiles --precision int8 --runs 1 --new-tokens 20 --ttft-lengths 512 2048 8192 \
        --grouped-min-slots 1000000000
    table ;;
*)
    echo "unknown part $PART: tests, sweeps, decode or prefill" >&2; exit 2 ;;
esac
