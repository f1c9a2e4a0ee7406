"""The Triton kernels, checked without a GPU (skipped where triton is not installed; CI installs it).

1. Triton's interpreter runs every kernel on the CPU against its PyTorch reference
   (tests/kernel_interpreter_checks.py, in its own process: TRITON_INTERPRET must be set before the
   kernels are defined).
2. Each kernel compiles for Hopper (sm_90, the H100/H200) with the launch specialisation Triton's JIT
   would use for Mixtral-8x7B's shapes, fits in shared memory, and the GEMM-shaped ones use the
   tensor cores' wgmma and asynchronous, pipelined loads (cp.async): a kernel that lost either would
   still be correct and run several times slower.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Fused multiply-adds, as the Triton that runs on the GPUs (3.6) does by default; 3.9 warns unless told.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
triton = pytest.importorskip("triton")

from gpt_fast_mixtral.kernels import allreduce, argmax, attention, linear, moe, router  # noqa: E402
from gpt_fast_mixtral.quantize import INT8_W13_BLOCK  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
HOPPER_SHARED_MEMORY = 232448  # bytes per block on sm_90 (227 KB)


def test_kernels_match_their_references_in_the_interpreter() -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "kernel_interpreter_checks.py")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert "all kernel checks passed" in result.stdout


# Integer arguments as Mixtral-8x7B's decode/prefill launches pass them: Triton's JIT specialises a
# pointer or integer divisible by 16 (it may then vectorise and pipeline loads), so the compile here does too.
SAMPLE_INTS = {"num_experts": 8, "num_m_tiles": 40, "dim": 4096, "inter": 14336, "top_k": 2, "num_tiles": 3584,
               "n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "M": 1, "N": 6144, "K": 4096, "eps": None,
               "numel": 4096, "capacity": 131072}


def compile_for_hopper(fn, types: list[str], constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexpr parameters left out take their defaults (e.g. PDL off)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(types), names
    signature = dict(zip(names, types, strict=True))
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        kind = signature[name]
        sample = SAMPLE_INTS.get(name, 16 if name.startswith("stride") else 1)
        if kind.startswith("*") or (kind.startswith("i") and sample is not None and sample % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# linear._linear_kernel's pointer and integer arguments for int8 weights and bfloat16 activations
INT8_LINEAR_TYPES = ["*bf16", "*i8", "*bf16", "*bf16"] + ["i32"] * 6

GROUPED_TYPES = {
    "gate_up": lambda w, act: [f"*{act}", f"*{w}", f"*{w}", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "*i32",
                               "*i32", "*i32", "i32", "i32", "i32", "i32", "i32", "i64", "i32", "i32", "i32"],
    "down": lambda w, act: [f"*{act}", f"*{w}", "*bf16", "*fp32", "*i32", "*bf16", "*fp32", "*i32", "*i32", "*i32",
                            "i32", "i32", "i32", "i32", "i32", "i64", "i32", "i32", "i32"],
}


# weights, activations: bfloat16 x bfloat16, int8 x bfloat16, and int8 x row-scaled float16 (grouped_int8_fp16)
@pytest.mark.parametrize("even_k", [True, False])  # False: the K dimension needs masks too
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("weights,act", [("i8", "bf16"), ("bf16", "bf16"), ("i8", "fp16")])
@pytest.mark.parametrize("kernel", ["gate_up", "down"])
def test_grouped_expert_kernels_compile_to_pipelined_tensor_core_code(kernel: str, weights: str, act: str,
                                                                      swap_ab: bool, even_k: bool) -> None:
    config = moe.MoEConfig()
    fn = moe._grouped_gate_up_kernel if kernel == "gate_up" else moe._grouped_down_kernel
    blocks = dict(BR=0, BC=0) if kernel == "gate_up" else {}
    if kernel == "gate_up" and weights == "i8" and even_k:  # int8 engines store w1 / w3 in blocks
        blocks = dict(zip(("BR", "BC"), INT8_W13_BLOCK, strict=True))
    gate_up_block_n, gate_up_warps, down_block_n = moe.grouped_tiles(config, fp16=act == "fp16")  # as launched
    block_n, warps = (gate_up_block_n, gate_up_warps) if kernel == "gate_up" else (down_block_n, config.grouped_warps)
    compiled = compile_for_hopper(
        fn, GROUPED_TYPES[kernel](weights, act),
        dict(HAS_SCALES=weights == "i8", PRECISION="tf32", MAGIC=config.int8_magic, EVEN_K=even_k,
             BLOCK_M=config.grouped_block_m, BLOCK_K=config.grouped_block_k, SWAP_AB=swap_ab, BLOCK_N=block_n,
             ROW_SCALE=act == "fp16", **blocks),
        num_warps=warps, num_stages=config.grouped_stages)
    ptx = compiled.asm["ptx"]
    assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY
    assert "wgmma.mma_async" in ptx, "the tiles must run on Hopper's tensor cores"
    assert "cp.async" in ptx, "the tile loads must be asynchronous (software pipelined)"
    if act == "fp16":  # the weights converted by int8_to_fp16's inline PTX, no integer-to-float conversions
        assert "sub.f16x2" in ptx and "cvt.rn.f16.s" not in ptx and "cvt.rn.f32.s" not in ptx


def test_prefill_moe_helper_kernels_compile() -> None:
    compile_for_hopper(moe._rows_to_fp16_kernel, ["*bf16", "*fp16", "*fp32", "i32", "i32", "i32"],
                       dict(BLOCK=2048), num_warps=8)
    compile_for_hopper(moe._group_slots_kernel, ["*i64"] + ["*i32"] * 7 + ["i32"] * 5,
                       dict(BLOCK=512, BLOCK_E=16), num_warps=16)
    compile_for_hopper(moe._sum_slots_kernel, ["*fp32", "*i64", "*bf16", "i32", "i32", "i32"],
                       dict(TOP_K=2, BLOCK=1024))


def cuobjdump(cubin: bytes, option: str) -> str:
    """The output of the cuobjdump of Triton's wheel with `option` for a cubin (skips the test without one)."""
    tool = next(Path(triton.__file__).parent.glob("backends/nvidia/bin/cuobjdump"), None)
    if tool is None:
        pytest.skip("no cuobjdump in this Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(tool), option, file.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """ptxas' resource use of a cubin ({"REG": ..., "LOCAL": ..., ...})."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}


def test_preloaded_linear_issues_every_weight_load_before_its_wait() -> None:
    """PRELOAD_CONFIG's CUDA-core kernel (float32 x, or gemv_preload_mma off) at Mixtral's wo (K 4096): the 4
    rows x 4096 int8 of a one-warp program are 32 16-byte loads a thread, all before griddepcontrol.wait
    (after it only x's), in registers without spilling."""
    config = linear.PRELOAD_CONFIG
    compiled = compile_for_hopper(linear._preloaded_gemv_kernel,
                                  ["*bf16", "*i8", "*bf16", "*bf16", "i32", "i32", "i32"],
                                  dict(MAGIC=True, BLOCK_N=config.gemv_preload_rows,
                                       BLOCK_K=config.gemv_preload_block_k, CHUNKS=4, PDL=True),
                                  num_warps=config.gemv_preload_warps, num_stages=1)
    ptx = compiled.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") < wait
    weight_loads = config.gemv_preload_rows * 4096 // (32 * config.gemv_preload_warps * 16)
    assert ptx[:wait].count("ld.global.v4.b32") >= weight_loads
    assert ptx[wait:].count("ld.global") <= 4096 * 2 // (32 * config.gemv_preload_warps * 16)  # x, bf16
    usage = resource_usage(compiled.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["REG"] <= 255, usage


def sass_after_wait(cubin: bytes) -> list[str]:
    """The SASS instructions (opcodes with modifiers) from griddepcontrol.wait (ACQBULK) on."""
    out = cuobjdump(cubin, "-sass")
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out)
    return ops[next(index for index, op in enumerate(ops) if op.startswith("ACQBULK")):]


@pytest.mark.parametrize("imma", [False, True])  # bf16 tensor cores, or int8 ones (PRELOAD_CONFIG's choice)
@pytest.mark.parametrize("k", [4096, 2048, 1024])  # Mixtral's wo, and its shards over 2 and 4 ranks
def test_preloaded_mma_linear_issues_every_weight_load_before_its_wait(k: int, imma: bool) -> None:
    """PRELOAD_CONFIG's tensor-core kernels (16-bit x): each warp's 16 rows x up to 1024 int8 columns are 32
    16-byte loads a thread, all before griddepcontrol.wait; after it only x's loads (8-byte) and the
    tensor-core products, in registers without spilling. On int8 tensor cores a thread runs under 1,000 SASS
    instructions after the wait (~750; the bf16 kernel's conversions alone are ~1,170, and x's fixed-point
    split redone in the tensor cores' operand layout, without linear._kept_int8, ~2,300)."""
    config = linear.PRELOAD_CONFIG
    assert config.gemv_preload_mma and config.gemv_preload_imma and linear.preloaded(k, True, config)
    split, block_k, chunks = linear.preload_mma_plan(k, config)
    assert split * chunks * block_k >= k and split * config.gemv_preload_mma_slice >= k
    kernel = linear._preloaded_imma_kernel if imma else linear._preloaded_mma_kernel
    compiled = compile_for_hopper(kernel, ["*bf16", "*i8", "*bf16", "*bf16", "i32", "i32", "i32"],
                                  dict(BLOCK_N=linear.MMA_ROWS, SPLIT=split, BLOCK_K=block_k, CHUNKS=chunks, PDL=True),
                                  num_warps=split, num_stages=1)
    ptx = compiled.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert ptx.index("griddepcontrol.launch_dependents") < wait
    assert ptx[:wait].count("ld.global.v4.b32") >= linear.MMA_ROWS * k // (32 * split * 16)
    assert "mma.sync" in ptx[wait:] and "mma.sync" not in ptx[:wait]
    assert bool(re.search(r"mma\.sync\.aligned\.m16n8k32\.row\.col\S*\.s32\.s8\.s8\.s32", ptx[wait:])) == imma
    assert 0 < ptx[wait:].count("ld.global") <= k * 2 // (32 * split * 8)  # x, bf16
    usage = resource_usage(compiled.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["REG"] <= 255, usage
    if imma:
        after = sass_after_wait(compiled.asm["cubin"])
        assert any(op.startswith("IMMA") for op in after) and len(after) < 1000, len(after)


def assert_pdl(ptx: str, prefetch: bool = False) -> None:
    """Programmatic dependent launch's wait and release (kernels.pdl); with `prefetch`, the weight tile
    asked of L2 before the wait."""
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert ("prefetch.global.L2" in ptx) == prefetch
    if prefetch:
        assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait")


@pytest.mark.parametrize("pdl_on", [False, True])
@pytest.mark.parametrize("single_pass", [False, True])
def test_block_end_kernel_compiles(single_pass: bool, pdl_on: bool) -> None:
    compiled = compile_for_hopper(moe._block_end_kernel, ["*fp32", "*bf16", "*bf16", "*bf16", "*bf16", "i32", "fp32"]
                                  + ["i32"] * 5,
                                  dict(SPLIT=2, TOP_K=2, END=True, BLOCK_D=4096 if single_pass else 2048,
                                       SINGLE_PASS=single_pass, PDL=pdl_on), num_warps=8)
    if pdl_on:
        assert_pdl(compiled.asm["ptx"])
    else:
        assert "griddepcontrol" not in compiled.asm["ptx"]


@pytest.mark.parametrize("pdl_on", [False, True])  # programmatic dependent launch (kernels.pdl)
@pytest.mark.parametrize("stages", [1, 3])  # MoEConfig.gemv_stages: loads a loop iteration ahead, or not
@pytest.mark.parametrize("blocked", [False, True])  # w1 / w3 row-major, or in the int8 engines' blocks
@pytest.mark.parametrize("persistent", [False, True])
def test_matrix_vector_expert_kernels_compile(persistent: bool, blocked: bool, stages: int, pdl_on: bool) -> None:
    config = moe.MoEConfig()
    common = dict(HAS_SCALES=True, MAGIC=True, PERSISTENT=persistent, STAGES=stages, PDL=pdl_on)
    blocks = dict(zip(("BR", "BC"), INT8_W13_BLOCK if blocked else (0, 0), strict=True))
    gate_up = compile_for_hopper(
        moe._gate_up_gemv_kernel, ["*bf16", "*i8", "*i8", "*bf16", "*bf16", "*bf16", "*i32", "i32", "i32", "i32",
                                   "i32", "i32", "i64", "i32", "i32", "i32"],
        dict(BLOCK_I=config.gemv_blocked_block_i if blocked else config.gemv_block_i,
             BLOCK_D=min(config.gemv_block_d, INT8_W13_BLOCK[1]) if blocked else config.gemv_block_d,
             **common, **blocks), num_warps=config.gemv_warps)
    down = compile_for_hopper(
        moe._down_gemv_kernel, ["*bf16", "*i8", "*bf16", "*fp32", "*i32", "*bf16", "i32", "i32", "i32", "i32",
                                "i64", "i32", "i32", "i32", "i32"],
        dict(zip(("BLOCK_O", "SPLIT"), moe.gemv_down_tile(config, 1), strict=True), BLOCK_I=config.gemv_down_block_i,
             PREFETCH=pdl_on, **common),
        num_warps=config.gemv_warps)
    for compiled in (gate_up, down):
        assert_wide_weight_loads(compiled.asm["ptx"], stages)
        # int8 -> float32 by int8_to_fp32's prmt into 2**23's mantissa, not by sign extension + integer add
        assert "prmt.b32" in compiled.asm["ptx"] and "0x7540" in compiled.asm["ptx"]
        assert "cvt.s32.s8" not in compiled.asm["ptx"]
    if pdl_on:  # down asks L2 for its tile before waiting for gate_up (not the persistent grid)
        assert_pdl(gate_up.asm["ptx"])
        assert_pdl(down.asm["ptx"], prefetch=not persistent)



@pytest.mark.parametrize("pdl_on", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_half2_gate_up_kernel_compiles_to_f16x2_products(blocked: bool, pdl_on: bool) -> None:
    """MoEConfig.gemv_int8_half2's gate_up at Mixtral's shape: int8 -> f16x2 by int8_to_fp16, products by
    fma.rn.f16x2 (no float32 FMAs in the loop), 16-byte weight loads, no spills (72 registers with Triton
    3.6: 8-row programs, 7 per SM)."""
    config = moe.MoEConfig()
    blocks = dict(zip(("BR", "BC"), INT8_W13_BLOCK if blocked else (0, 0), strict=True))
    block_d = min(config.gemv_block_d, config.gemv_half2_block_d, INT8_W13_BLOCK[1] if blocked else 1 << 30)
    compiled = compile_for_hopper(
        moe._gate_up_gemv_kernel, ["*bf16", "*i8", "*i8", "*bf16", "*bf16", "*bf16", "*i32", "i32", "i32", "i32",
                                   "i32", "i32", "i64", "i32", "i32", "i32"],
        dict(BLOCK_I=config.gemv_half2_block_i, BLOCK_D=block_d, HAS_SCALES=True, MAGIC=True, PERSISTENT=False,
             STAGES=1, PDL=pdl_on, HALF2=True, X_BLOCK=4096, X_LIMIT=moe.half2_x_limit(4096, block_d), **blocks),
        num_warps=config.gemv_warps, num_stages=1)
    ptx = compiled.asm["ptx"]
    assert "fma.rn.f16x2" in ptx and "sub.f16x2" in ptx and "0x6480" in ptx.lower()  # int8_to_fp16's bias
    assert "fma.rn.f32" not in ptx and "cvt.s32.s8" not in ptx
    assert_wide_weight_loads(ptx, 1)
    if pdl_on:
        assert_pdl(ptx)
        # Waits before letting the next kernel in: the decode attention's loads of cached keys before its
        # own wait rely on one kernel of every layer doing so (kernels.attention).
        assert ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch_dependents")
    usage = resource_usage(compiled.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["REG"] <= 96, usage

def assert_wide_weight_loads(ptx: str, stages: int) -> None:
    """16-byte weight loads (anything narrower leaves a matrix-vector product short of bandwidth): into
    registers, or with stages > 1 as asynchronous copies into shared memory a few iterations ahead."""
    if stages == 1:
        assert "ld.global.v4.b32" in ptx or "ld.global.nc.v4.b32" in ptx
        assert "cp.async" not in ptx
    else:
        assert "cp.async.cg.shared.global" in ptx and ", 16, " in ptx  # cg: 16 bytes, past L1


@pytest.mark.parametrize("tiles", [1, 2, 3])
def test_one_token_linear_loads_its_first_tiles_before_the_pdl_wait(tiles: int) -> None:
    """LinearConfig.gemv_pdl_tiles: Mixtral's wqkv plan (8 x 512 int8 tiles, pipelined) issues that many
    tiles' 16-byte weight loads (4 KB over 128 threads: two a thread each) before griddepcontrol.wait and
    takes no product before it; the loop after the wait starts past them."""
    block_n, block_k, stages = linear.gemv_plan(6144, 4096)
    assert (block_n, block_k) == (8, 512) and stages > 1
    compiled = compile_for_hopper(linear._linear_kernel,
                                  INT8_LINEAR_TYPES,
                                  dict(MAGIC=True, IEEE=False, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k,
                                       PERSISTENT=False, STAGES=stages, DEFER=True, PDL=True, PDL_TILES=tiles),
                                  num_stages=1)
    ptx = compiled.asm["ptx"]
    before = ptx[:ptx.index("griddepcontrol.wait")]
    assert before.count("ld.global.v4.b32") + before.count("ld.global.nc.v4.b32") == tiles * 2
    assert "fma" not in before
    assert_wide_weight_loads(ptx, stages)


def test_greedy_state_kernel_compiles_with_the_position_read_before_the_wait() -> None:
    compiled = compile_for_hopper(argmax._greedy_state_kernel, ["*bf16", "*i64", "*i64", "i32", "i32", "i32", "i32"],
                                  dict(BLOCK_V=16384, PDL=True), num_warps=16)
    ptx = compiled.asm["ptx"]
    assert_pdl(ptx)
    wait = ptx.index("griddepcontrol.wait")
    # the row's position (a step input) before the wait, every logit after it
    assert ptx[:wait].count("ld.global") == 1 and ptx.index("griddepcontrol.launch_dependents") < wait
    assert ptx[wait:].count("ld.global") >= 1


def test_router_single_pass_takes_as_few_warps_as_its_weights_allow() -> None:
    assert router.single_pass_warps(4096, 8, 2) == 8  # Mixtral, bfloat16: 256 bytes a thread
    assert router.single_pass_warps(4096, 8, 4) == 16
    assert router.single_pass_warps(4096, 16, 4) == 16  # capped (512 bytes a thread)
    assert router.single_pass_warps(6144, 8, 2) == 16  # D rounded up to 8192
    assert router.single_pass_warps(1024, 5, 2) == 2  # E rounded up to 8
    assert router.single_pass_warps(64, 2, 2) == 1


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_router_single_pass_keeps_its_weights_in_registers(dtype: str) -> None:
    """At the warps it is launched with, Mixtral's router (gate weights [8, 4096] in the activation dtype)
    loads its weights before the wait and holds them without spilling."""
    warps = router.single_pass_warps(4096, 8, 2 if dtype == "bf16" else 4)
    compiled = compile_for_hopper(router._residual_norm_route_kernel,
                                  [f"*{dtype}"] * 6 + [f"*{dtype}", "*i64", "i32", "i32", "fp32"] + ["i32"] * 5,
                                  dict(TOP_K=2, BLOCK_K=2, BLOCK_D=4096, BLOCK_E=8, SINGLE_PASS=True, PDL=True),
                                  num_warps=warps)
    ptx = compiled.asm["ptx"]
    assert_pdl(ptx)
    wait = ptx.index("griddepcontrol.wait")
    assert ptx[:wait].count("ld.global") >= 2 and ptx[wait:].count("ld.global") >= 2  # weights; x and delta
    usage = resource_usage(compiled.asm["cubin"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage


def test_decode_kernels_compile() -> None:
    compile_for_hopper(router._residual_norm_route_kernel,
                       ["*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "*fp32", "*i64", "i32", "i32",
                        "fp32", "i32", "i32", "i32", "i32", "i32"],
                       dict(TOP_K=2, BLOCK_K=2, BLOCK_D=1024, BLOCK_E=8, SINGLE_PASS=False), num_warps=4)
    compile_for_hopper(attention._rope_rows_kernel, ["*bf16", "*fp32", "*fp32", "*bf16", "i32", "i32", "i32", "i32",
                                                     "i32", "i32", "i32", "i32"], dict(BLOCK_H=4, BLOCK_HALF=64))
    for rope, release_late in ((False, False), (True, False), (True, True)):
        compiled = compile_for_hopper(attention._decode_attention_kernel,
                                      ["*bf16", "*bf16", "*bf16", "*i64", "*bf16", "*fp32", "*fp32", "*fp32", "*i32",
                                       "*fp32", "*fp32"] + ["i32"] * 17,
                                      dict(GROUP=4, BLOCK_G=16, BLOCK_S=64, BLOCK_HALF=64, SPLITS=32, BLOCK_GC=4,
                                           COMBINE=16, MIN_CHUNK=128, SINGLE_SPAN=192,
                                           SCALE=128 ** -0.5, PRECISION="tf32", ROPE=rope, PDL=rope,
                                           RELEASE_AFTER_FIRST_TILE=release_late, PREFETCH=rope), num_stages=2)
        if rope:
            ptx = compiled.asm["ptx"]
            release = ptx.index("griddepcontrol.launch_dependents")
            assert ptx.count("griddepcontrol.launch_dependents") == 1
            # late: after the wait and after the first tile's scores (the keys' tensor-core product)
            wait = ptx.index("griddepcontrol.wait")
            assert (release > wait) == release_late
            # the chunk's cached keys and values past the first tile asked of L2 before the wait, none after
            assert "prefetch.global.L2" in ptx[:wait] and "prefetch.global.L2" not in ptx[wait:]
            assert resource_usage(compiled.asm["cubin"])["LOCAL"] == 0
            assert (release > ptx.index("mma.sync")) == release_late
            # The first tile of cached keys and values (two halves each of 64 x 64 bfloat16: 16 16-byte
            # loads a thread) is loaded before the wait, and no product is taken before it.
            assert ptx[:wait].count("ld.global.v4.b32") == 16
            assert "mma.sync" not in ptx[:wait]
            # The new position's key and value are loaded with the queries after the wait, not after the
            # loop: no global load is left between the last product and the chunks' combine (10 before).
            last = ptx.rindex("mma.sync")
            assert ptx[last:ptx.index("atom.", last)].count("ld.global") == 0
            # The combine loads its partials (".cg") with no store between them: one round trip to L2, not a
            # load-store chain per head (~24 us a Mixtral layer past 256 positions, session 29).
            combine = ptx[ptx.index("atom.", last):]
            loads = combine[combine.index("ld.global.cg"):combine.rindex("ld.global.cg")]
            assert combine.count("ld.global.cg") >= 4 and "st.global" not in loads
    for persistent, stages, defer, pdl_on in ((False, 1, False, False), (True, 1, False, False),
                                              (False, 3, False, False), (False, 3, True, False),
                                              (False, 3, True, True), (False, 1, False, True), (True, 1, False, True)):
        compiled = compile_for_hopper(linear._linear_kernel,
                                      INT8_LINEAR_TYPES,
                                      dict(MAGIC=True, IEEE=False, BLOCK_M=1, BLOCK_N=2, BLOCK_K=2048,
                                           PERSISTENT=persistent, STAGES=stages, DEFER=defer, PDL=pdl_on,
                                           PREFETCH=pdl_on),
                                      num_stages=1)
        assert_wide_weight_loads(compiled.asm["ptx"], stages)
        if pdl_on:
            assert_pdl(compiled.asm["ptx"], prefetch=not persistent)
    compile_for_hopper(linear._linear_kernel,
                       INT8_LINEAR_TYPES,
                       dict(MAGIC=True, IEEE=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, PERSISTENT=False, STAGES=1,
                            DEFER=False))
    # bf16 weights and no scales (linear.linear): HALF_CONFIG's tiles, unpipelined and pipelined, with PDL
    for block_n, block_k, stages in ((2, 2048, 1), (4, 1024, 2)):
        compiled = compile_for_hopper(linear._linear_kernel,
                                      ["*bf16", "*bf16", "*bf16", "i32", "i32", "i32", "i32", "i32", "i32"],
                                      dict(s_ptr=None, MAGIC=True, IEEE=False, BLOCK_M=1, BLOCK_N=block_n,
                                           BLOCK_K=block_k, PERSISTENT=False, STAGES=stages, DEFER=stages > 1,
                                           PDL=True, SCALED=False),
                                      num_stages=1)
        assert_wide_weight_loads(compiled.asm["ptx"], stages)
        assert_pdl(compiled.asm["ptx"])


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_push_all_reduce_sends_and_polls_16_bytes_at_a_time(dtype: str) -> None:
    """Pushes to peers as 16-byte stores and waits with 16-byte volatile loads (not cached: a peer's
    store must become visible to the spinning loop); scalar code would take many more NVLink packets."""
    import triton.language as tl

    bits, empty = (tl.int16, -(1 << 15)) if dtype == "bf16" else (tl.int32, -(1 << 31))
    constexprs = dict(BITS=bits, RANK=1, WORLD=8, PHASES=3, SENTINEL=empty, BLOCK=allreduce.BLOCK)
    ptx = compile_for_hopper(allreduce._push_all_reduce_kernel,
                             [f"*{dtype}", f"*{dtype}", "*i64", "*i32", "i32", "i32"], constexprs).asm["ptx"]
    assert "st.global.v4.b32" in ptx
    assert "ld.volatile.global.v4.b32" in ptx
    assert "ld.volatile.global.b16" not in ptx and "ld.volatile.global.b32" not in ptx


@pytest.mark.parametrize("route", [True, False])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fused_push_all_reduce_sends_and_polls_16_bytes_at_a_time(dtype: str, route: bool) -> None:
    """The push all-reduce fused with the residual add, the norm and the routing (Mixtral's 4096-wide rows,
    16 warps as PushAllReduce.residual_norm launches it) pushes and polls as the plain kernel does."""
    import triton.language as tl

    bits, empty = (tl.int16, -(1 << 15)) if dtype == "bf16" else (tl.int32, -(1 << 31))
    constexprs = dict(BITS=bits, RANK=1, WORLD=8, PHASES=3, SENTINEL=empty, BLOCK_D=4096, ROUTE=route, TOP_K=2,
                      BLOCK_K=2, BLOCK_E=8)
    types = [f"*{dtype}"] * 7 + ["*i64", "*i64", "*i32", "i32", "i32", "i32", "fp32", "i32"] + ["i32"] * 6
    ptx = compile_for_hopper(allreduce._push_residual_norm_kernel, types, constexprs, num_warps=16).asm["ptx"]
    assert "st.global.v4.b32" in ptx
    assert "ld.volatile.global.v4.b32" in ptx
    assert "ld.volatile.global.b16" not in ptx and "ld.volatile.global.b32" not in ptx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # gate_up's float32 / float16 products
def test_gate_up_launch_names_every_kernel_parameter(dtype, monkeypatch) -> None:
    """torch.compile's tracing of a user Triton kernel (the decode step without PDL) takes no defaults from
    the kernel's signature: a launch must give every parameter, those with defaults too."""
    launches = []

    class Launched(Exception):
        pass

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((args, kwargs))
                raise Launched
            return launch

    kernel = moe._gate_up_gemv_kernel
    monkeypatch.setattr(moe, "_gate_up_gemv_kernel", Spy())
    experts, inter, dim = 3, 16, 64
    w13 = torch.ones(experts, inter, dim, dtype=torch.int8)
    w2 = torch.ones(experts, dim, inter, dtype=torch.int8)
    scales = (torch.ones(experts, inter), torch.ones(experts, dim), torch.ones(experts, inter))
    x = torch.randn(1, dim).to(dtype)
    with pytest.raises(Launched):
        moe._moe_decode(x, w13, w2, w13, torch.ones(2, dtype=dtype), torch.tensor([0, 2]), scales, moe.MoEConfig(),
                        None, None)
    (args, kwargs), = launches
    assert kwargs["HALF2"] == (dtype == torch.bfloat16)
    given = len(args) + len(set(kwargs) - {"num_warps", "num_stages", "launch_pdl"})
    assert given == len(kernel.arg_names), (sorted(kwargs), kernel.arg_names)


@pytest.mark.parametrize("fused", ["", "route", "partials"])
def test_push_all_reduce_kernels_release_first_and_read_nothing_written_before_their_wait(fused: str) -> None:
    """kernels.allreduce.PDL: a push kernel lets the next kernel in first thing (its programs then load their
    weights while the exchange waits on the peers) and reads nothing another kernel writes, its phase counters
    and the partial sums (or the experts' float32 partials) included, before its wait: only the norm and
    router weights may come before it."""
    import triton.language as tl

    if fused:
        route = fused == "route"
        constexprs = dict(BITS=tl.int16, RANK=1, WORLD=2, PHASES=3, SENTINEL=-(1 << 15), BLOCK_D=4096, ROUTE=route,
                          TOP_K=2, BLOCK_K=2, BLOCK_E=8, PDL=True, SPLIT=0 if route else 2, PART_K=2)
        types = ["*fp32" if fused == "partials" else "*bf16"] + ["*bf16"] * 6
        types += ["*i64", "*i64", "*i32", "i32", "i32", "i32", "fp32", "i32"] + ["i32"] * 6
        ptx = compile_for_hopper(allreduce._push_residual_norm_kernel, types, constexprs, num_warps=16).asm["ptx"]
    else:
        constexprs = dict(BITS=tl.int16, RANK=1, WORLD=2, PHASES=3, SENTINEL=-(1 << 15), BLOCK=allreduce.BLOCK,
                          PDL=True)
        ptx = compile_for_hopper(allreduce._push_all_reduce_kernel, ["*bf16", "*bf16", "*i64", "*i32", "i32", "i32"],
                                 constexprs).asm["ptx"]
    release, wait = ptx.index("griddepcontrol.launch_dependents"), ptx.index("griddepcontrol.wait")
    assert release < wait
    before = ptx[:wait]
    assert "st.global" not in before and "ld.volatile" not in before
    # fused: the norm weights (4096 bfloat16 over 512 threads: one 16-byte load each) and the router's 8 rows
    assert before.count("ld.global") == {"": 0, "route": 9, "partials": 1}[fused]
    if fused == "partials":  # the experts' partials (2 splits x 2 slots, float32) after the wait, 16 bytes a load
        assert ptx[wait:].count("ld.global.v4.b32") >= 4
