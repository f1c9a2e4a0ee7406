"""Session 35 archive, superseded: the argmax kernel tried in session 35 (torch.compile of the decode step with it
never finished there; h200_s35_argmax_kernel_compile.log) is now part of the package as
gpt_fast_mixtral/kernels/argmax.py (session 36), with the next position added and the compile hang explained and
avoided (benchmarks/NOTES.md, session 36). The file as session 35 ran it: `git show 9cf8457:benchmarks/results/argmax_kernel_session35.py`.
"""
