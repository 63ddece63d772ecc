"""Solvers of the low-rank + block-sparse problem.

``problem`` (data, options, objective, maps), ``base`` (the solver protocol),
``fista`` and ``admm`` (its two implementations), ``loop`` (the generic loop),
``adjoint`` and ``implicit`` (differentiation modes), ``decomposition`` (the
jitted driver), ``decompose`` and ``rpca`` (the public functions).
"""
