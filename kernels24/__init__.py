"""2:4 sparsity beyond masks: pack.py writes 2:4 checkpoints in the compressed format of packed.py (any device),
sparse.py runs them on sparse tensor cores (CUDA, compute capability >= 8.0), bench.py measures where that pays."""
