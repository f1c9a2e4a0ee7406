#!/bin/bash
# Session 40, call 9 of h200_s40_router_attention.log. Edits the launch in place: run it on a scratch copy.
# Session 40: where does the attention prefetch's illegal address come from? Prefetch forced on without PDL.
sed -i 's/PREFETCH=PREFETCH_CHUNK and rope is not None and use_pdl/PREFETCH=PREFETCH_CHUNK and rope is not None/' gpt_fast_mixtral/kernels/attention.py
grep -c "PREFETCH=PREFETCH_CHUNK and rope is not None," gpt_fast_mixtral/kernels/attention.py
timeout -s ABRT 200 python3 -c "
import sys; sys.path.insert(0, '.')
from gpt_fast_mixtral.kernels import pdl; pdl.ENABLED = False
import pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:logging', 'tests/test_kernels.py', '-k', 'rope_cache_attention or fused_rope']))" > /tmp/a.log 2>&1; echo "eager no-PDL rc=$? $(grep -E 'passed|failed' /tmp/a.log | tail -1)"; grep -E "^FAILED|Error:" /tmp/a.log | head -5
T="tests/test_gpu.py::test_decode_with_and_without_programmatic_dependent_launch"
timeout -s ABRT 200 python3 -m pytest -q -x -p no:logging "$T" > /tmp/b.log 2>&1; echo "compiled rc=$? $(grep -E 'passed|failed' /tmp/b.log | tail -1)"
timeout -s ABRT 200 python3 -c "
import sys; sys.path.insert(0, '.')
from gpt_fast_mixtral.kernels import attention; attention.PREFETCH_CHUNK = False
import pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:logging', '$T']))" > /tmp/c.log 2>&1; echo "compiled, prefetch off rc=$? $(grep -E 'passed|failed' /tmp/c.log | tail -1)"
grep -n "def test_decode_with_and_without_programmatic_dependent_launch" -A30 tests/test_gpu.py | grep -n "max_seq_len\|prompt\|new_tokens\|generate" | head
