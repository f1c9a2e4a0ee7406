"""Session 31 (h200_s31_oracles.log, call s31f): a perfect guess of the experts, asked of L2 during the attention.
gate_up reads experts 0 and 1 (GU_FIX=1, oracles_session31.patch applied to 65b44ca); a kernel of PF_PROGS one-warp
programs between the attention and wo in the PDL chain (released first thing, waiting at its end) asks L2 for the
first PF_MB MiB of w1 and of w3 of both (PF_EVL=1: with evict_last). PF_MB=0: no such kernel. Runs
oracle_sweep_session31.py's measurement (copied to .devtmp/sweep.py when it ran):
GU_FIX=1 NAME=x GEN=3 POS=105 PF_MB=10 PYTHONPATH=. python3 benchmarks/results/guessed_expert_prefetch_session31.py"""
import os, sys
sys.path[:0] = [".devtmp", "scripts", "."]
import torch, triton, triton.language as tl
from gpt_fast_mixtral.kernels import pdl, moe as M
from gpt_fast_mixtral.kernels.pdl import pdl_release, pdl_wait
from gpt_fast_mixtral import model as Mo

PF = int(float(os.environ.get("PF_MB", "0")) * 2**20)
NPROG = int(os.environ.get("PF_PROGS", "1024"))

@triton.jit
def _pf_kernel(w1_ptr, w3_ptr, flag_ptr, stride_we, chunk, E0, E1, LINES: tl.constexpr, EVL: tl.constexpr):
    pdl_release(True)
    pid = tl.program_id(0).to(tl.int64)
    for r in tl.static_range(4):
        base = (w1_ptr if r % 2 == 0 else w3_ptr) + (E0 if r < 2 else E1) + pid * chunk
        base = base.to(tl.pointer_type(tl.int8), bitcast=True)
        for start in range(0, chunk, LINES * 128):
            cols = start + tl.arange(0, LINES) * 128
            addr = (base + cols).to(tl.int64)
            if EVL:
                tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; } mov.b32 $0, 0;",
                                          "=r,l,r", [addr, (cols < chunk).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; } mov.b32 $0, 0;",
                                          "=r,l,r", [addr, (cols < chunk).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    pdl_wait(True)
    if pid == 0:
        tl.store(flag_ptr, 1)

@torch.library.custom_op("s31::prefetch", mutates_args=("out",))
def prefetch(out: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, flag: torch.Tensor) -> None:
    chunk = PF // NPROG // 4096 * 4096
    _pf_kernel[(NPROG,)](w1, w3, flag, w1.stride(0), chunk, 0, w1.stride(0), LINES=32, EVL=os.environ.get("PF_EVL") == "1",
                         num_warps=1, **pdl.launch_options(True))

@prefetch.register_fake
def _(out, w1, w3, flag):
    return None

from gpt_fast_mixtral.kernels import attention as AK
_orig_fwd = Mo.Attention.forward
def fwd(self, x, cos, sin, input_pos, kv_len):
    batch, seq_len, _ = x.shape
    if PF and seq_len == 1 and AK.available(x) and self.rope_table is not None and getattr(self, "_pf", None):
        q_size = self.n_heads * self.head_dim
        cache, table = self.kv_cache, self.rope_table
        out = AK.rope_cache_attention(
            self.wqkv(x).view(batch, -1), table[..., 0], table[..., 1], cache.k_cache, cache.v_cache,
            input_pos[:, 0], self.n_heads, self.n_kv_heads, self.head_dim, self.sliding_window, cache.counters,
            release_after_first_tile=getattr(self.wo, "preloads_weight", False))
        ffn, flag = self._pf
        prefetch(out, ffn.w1, ffn.w3, flag)
        return self.wo(out.view(batch, 1, q_size))
    return _orig_fwd(self, x, cos, sin, input_pos, kv_len)
Mo.Attention.forward = fwd

_orig_setup = Mo.Transformer.setup_caches
def setup(self, *a, **k):
    _orig_setup(self, *a, **k)
    for layer in self.layers:
        layer.attention._pf = (layer.block_sparse_moe.cond_ffn, torch.zeros(1, dtype=torch.int32, device=self.device))
Mo.Transformer.setup_caches = setup
exec(open("benchmarks/results/oracle_sweep_session31.py").read())
