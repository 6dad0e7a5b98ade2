"""Merge methods, one object each (`base.MergeMethod`), by name in `registry`.

- `base`: `MergeMethod`, `Param`, `TensorInputs`: what a method declares and what it is given
- `streaming`: `StreamedMethod`, `Passes`: whole-tensor methods whose statistics are gathered in
  passes over row blocks, then merged block by block
- `trim`: exact top-k selection (exactly k entries, ties broken by flat index), streamed
- `registry`: every method `wb merge` knows, `names()`, `get(name)`
- `mergekit_methods`: mergekit 0.1.5's methods (`MERGEKIT_METHODS`)
- `ties`: peft's TIES and DARE (`peft_ties`, streamed; `peft_dare_linear`, `peft_dare_ties`, on whole tensors)
"""
