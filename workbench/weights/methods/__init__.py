"""Merge methods, one object each (`base.MergeMethod`), by name in `registry`.

- `base`: `MergeMethod`, `Param`, `MergeBlock`: what a method declares and what it is given
- `registry`: every method `wb merge` knows, `names()`, `get(name)`
- `linear`: base + Σ wᵢ·τᵢ, in row blocks
- `ties`: TIES and DARE, one generalized task arithmetic (sparsify by magnitude or at random,
  sign election on or off), on whole tensors
"""
