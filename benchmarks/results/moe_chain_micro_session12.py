"""Session 12 micro: gate_up + down chained in one launch, variants of the synchronisation (one H200)."""
import sys, dataclasses
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "benchmarks")]
import torch, triton, triton.language as tl
from graph_timing import graph_replay_us
from gpt_fast_mixtral.kernels import moe
from gpt_fast_mixtral.kernels.moe import _gate_up_gemv_tile, _down_gemv_tile, _split_blocks, _block_args, _block_cols
from gpt_fast_mixtral.quantize import INT8_W13_BLOCK

@triton.jit
def chain_v(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, w2_ptr, s2_ptr, y_ptr, experts_ptr, routing_ptr, sync_ptr,
            top_k, slots, dim, inter, stride_x, stride_we13, stride_wi, stride_se13, stride_h,
            stride_we2, stride_wd, stride_se2, stride_y, stride_split,
            HAS_SCALES: tl.constexpr, MAGIC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
            BR: tl.constexpr, BC: tl.constexpr, SPLIT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I2: tl.constexpr,
            STAGES: tl.constexpr, TICKET: tl.constexpr, FINISH: tl.constexpr, WAIT: tl.constexpr,
            GU: tl.constexpr, DN: tl.constexpr):
    i_blocks = tl.cdiv(inter, BLOCK_I)
    gate_up_tiles = slots * i_blocks
    o_blocks = tl.cdiv(dim, BLOCK_O)
    down_tiles = slots * o_blocks * SPLIT
    tiles = gate_up_tiles + down_tiles
    if TICKET:
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    else:
        ticket = tl.program_id(0)
    if ticket < gate_up_tiles:
        if GU:
            slot = ticket % slots
            i_block = ticket // slots
            _gate_up_gemv_tile(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, experts_ptr, top_k, slot, i_block,
                               dim, inter, stride_x, stride_we13, stride_wi, stride_se13, stride_h,
                               HAS_SCALES, MAGIC, BLOCK_I, BLOCK_D, BR, BC, STAGES)
            if WAIT:
                tl.debug_barrier()
                split_len = tl.cdiv(tl.cdiv(inter, SPLIT), BLOCK_I2) * BLOCK_I2
                row_end = tl.minimum((i_block + 1) * BLOCK_I, inter)
                for split in range((i_block * BLOCK_I) // split_len, (row_end - 1) // split_len + 1):
                    tl.atomic_add(sync_ptr + 2 + split, 1, sem="release", scope="gpu")
    else:
        if DN:
            tile = ticket - gate_up_tiles
            split = tile // (slots * o_blocks)
            slot = tile % slots
            o_block = (tile // slots) % o_blocks
            if WAIT:
                first, last = _split_blocks(split, inter, SPLIT, BLOCK_I, BLOCK_I2)
                done = sync_ptr + 2 + split
                while tl.load(done, volatile=True) < (last - first) * slots:
                    pass
                tl.atomic_add(done, 0, sem="acquire", scope="gpu")
                if FINISH == 1:
                    if tl.atomic_add(sync_ptr + 1, 1, sem="relaxed", scope="gpu") == down_tiles - 1:
                        offs = tl.arange(0, 64)
                        tl.store(sync_ptr + offs, tl.zeros([64], tl.int32), mask=offs < 2 + SPLIT)
                tl.debug_barrier()
            _down_gemv_tile(h_ptr, w2_ptr, s2_ptr, y_ptr, experts_ptr, routing_ptr, slot, o_block, split,
                            dim, inter, stride_h, stride_we2, stride_wd, stride_se2, stride_y, stride_split,
                            HAS_SCALES, MAGIC, SPLIT, BLOCK_O, BLOCK_I2, STAGES, True)
    if FINISH == 0:
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == tiles - 1:
            offs = tl.arange(0, 64)
            tl.store(sync_ptr + offs, tl.zeros([64], tl.int32), mask=offs < 2 + SPLIT)
    elif not WAIT:
        if TICKET:
            if tl.atomic_add(sync_ptr + 1, 1, sem="relaxed", scope="gpu") == tiles - 1:
                tl.store(sync_ptr, 0)
                tl.store(sync_ptr + 1, 0)


def run_chain(x, w1, w2, w3, routing, ids, scales, block, sync, c, ticket, finish, wait, gu=True, dn=True, grid_gu=True, grid_dn=True):
    num_tokens, top_k = ids.shape
    E, inter, dim = w1.shape
    slots = num_tokens * top_k
    experts = ids.reshape(-1)
    h = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(c.gemv_split, slots, dim, dtype=torch.float32, device=x.device)
    s1, s2, s3 = scales
    block_i = moe.gemv_rows(inter, c, block)
    gt = slots * triton.cdiv(inter, block_i)
    dt = slots * triton.cdiv(dim, c.gemv_down_block_o) * c.gemv_split
    chain_v[((gt if grid_gu else 0) + (dt if grid_dn else 0),)](
        x, w1, w3, s1, s3, h, w2, s2, y, experts, routing.flatten(), sync, top_k, slots,
        dim, inter, x.stride(0), w1.stride(0), w1.stride(1), s1.stride(0), h.stride(0),
        w2.stride(0), w2.stride(1), s2.stride(0), y.stride(1), y.stride(0),
        HAS_SCALES=True, MAGIC=True, BLOCK_I=block_i, BLOCK_D=_block_cols(c.gemv_block_d, block), **_block_args(block),
        SPLIT=c.gemv_split, BLOCK_O=c.gemv_down_block_o, BLOCK_I2=c.gemv_down_block_i, STAGES=c.gemv_stages,
        TICKET=ticket, FINISH=finish, WAIT=wait, GU=gu, DN=dn, num_warps=c.gemv_warps)
    return y


def main():
    E, TOP_K, D, INTER = 8, 2, 4096, 14336
    layers = 8
    c = moe.DEFAULT_CONFIG
    for W in [int(a) for a in sys.argv[1:]] or [1, 2]:
        inter = INTER // W
        g = torch.Generator(device="cuda").manual_seed(W)
        i8 = lambda *s: torch.randint(-127, 128, s, dtype=torch.int8, device="cuda", generator=g)
        block = INT8_W13_BLOCK
        w1s = [moe.block_rows(i8(E, inter, D), block) for _ in range(layers)]
        w3s = [moe.block_rows(i8(E, inter, D), block) for _ in range(layers)]
        w2s = [i8(E, D, inter) for _ in range(layers)]
        scales = tuple(torch.rand(E, n, device="cuda", generator=g).bfloat16() * 1e-3 for n in (inter, D, inter))
        ids = [torch.randperm(E, device="cuda", generator=g)[:TOP_K].view(1, TOP_K) for _ in range(layers)]
        routing = torch.tensor([[0.6, 0.4]], device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, D, device="cuda", generator=g, dtype=torch.bfloat16)
        sync = torch.zeros(64, dtype=torch.int32, device="cuda")
        ref = moe.fused_moe(x, w1s[0], w2s[0], w3s[0], routing, ids[0], scales, c, block).float()
        def full(y):
            return y.sum(0).view(1, TOP_K, D).sum(1).float()
        t = graph_replay_us(lambda: [moe.fused_moe(x, w1s[n], w2s[n], w3s[n], routing, ids[n], scales, c, block) for n in range(layers)]) / layers
        print(f"W={W} default two kernels + eager sums   {t:7.2f} us", flush=True)
        variants = {
            "chain ticket, acq_rel end (package)": dict(ticket=True, finish=0, wait=True),
            "chain ticket, count after poll": dict(ticket=True, finish=1, wait=True),
            "chain pid roles, count after poll": dict(ticket=False, finish=1, wait=True),
            "chain ticket, no waits (wrong)": dict(ticket=True, finish=2, wait=False),
            "chain pid roles, no waits (wrong)": dict(ticket=False, finish=2, wait=False),
            "gate_up only (pid, grid gu)": dict(ticket=False, finish=2, wait=False, dn=False, grid_dn=False),
            "down only (pid, grid dn)": dict(ticket=False, finish=2, wait=False, gu=False, grid_gu=False),
        }
        for name, v in variants.items():
            try:
                y = run_chain(x, w1s[0], w2s[0], w3s[0], routing, ids[0], scales, block, sync, c, **v)
                err = ((full(y) - ref).norm() / ref.norm()).item() if (v.get("gu", True) and v.get("dn", True) and v.get("grid_gu", True)) else float("nan")
                torch.cuda.synchronize()
                left = sync.tolist()[:8]
                sync.zero_()
                us = graph_replay_us(lambda v=v: [run_chain(x, w1s[n], w2s[n], w3s[n], routing, ids[n], scales, block, sync, c, **v) for n in range(layers)]) / layers
                print(f"W={W} {name:38} {us:7.2f} us  err {err:.1e} sync {left}", flush=True)
                sync.zero_()
            except Exception as e:
                print(f"W={W} {name}: failed {type(e).__name__} {str(e)[:300]}", flush=True)
                sync.zero_()
        del w1s, w2s, w3s
        torch.cuda.empty_cache()

main()
