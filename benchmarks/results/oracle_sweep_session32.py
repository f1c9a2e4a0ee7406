"""Session 32: the router's oracles (h200_s32_route_oracles.log). The measurement of oracle_sweep_session31.py
(GEN=n: n fresh 200-token decodes from the benchmark's 5-token prompt; POS: pure steps at those positions, fresh),
with route_oracles_session32.patch applied (applies to 7e6e81b). The switch RT=1..6 picks the variant (the patch's
header says what each does); this script makes the buffers the patch reads before any graph is captured: the
fixed routing (model._RT_FIXED) and the routing programs' partials, ids and rows (linear._ROUTE_BUFS).
The session ran a copy of session 31's script with these buffers added; it is kept as this wrapper, which
runs the same code.
Command: NAME=x RT=n GEN=3 POS=105 PYTHONPATH=. python3 benchmarks/results/oracle_sweep_session32.py"""
import runpy
import sys
from pathlib import Path

sys.path[:0] = ["scripts", "."]
import torch

from gpt_fast_mixtral import model as _model
from gpt_fast_mixtral.kernels import linear as _L

_dev = torch.device("cuda", 0)
_model._RT_FIXED[_dev] = (torch.tensor([[i % 8, (i + 3) % 8] for i in range(32)], dtype=torch.int64, device=_dev),
                          torch.tensor([[0.5, 0.5]], dtype=torch.bfloat16, device=_dev))
_L._ROUTE_BUFS[_dev] = (torch.randn(64, device=_dev), torch.zeros(2, dtype=torch.int64, device=_dev),
                        torch.randn(16, 4096, device=_dev) / 64)
runpy.run_path(str(Path(__file__).with_name("oracle_sweep_session31.py")), run_name="__main__")
