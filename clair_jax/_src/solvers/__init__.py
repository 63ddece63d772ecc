"""Solvers of the low-rank + block-sparse problem: FISTA, ADMM, loop, implicit derivatives."""
