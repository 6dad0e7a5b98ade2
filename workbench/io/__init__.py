"""Checkpoint I/O shared by every weight command; import the submodule you need.

- `layout`: which files hold a model's weights (torch-free; validates index files)
- `reader`: `open_checkpoint`, lazy zero-copy access to tensors
- `writer`: `write_checkpoint`, sharded safetensors written in one pass, hashed and summed
- `safetensors_format`: the safetensors header parsed and laid out by hand
- `blocks`: `row_blocks`, the one way streaming commands cut a tensor into row blocks (torch-free)
- `hashing`, `weightsum`: file hashes in md5sum format, the float64 weight-sum
- `paths`: names read from files joined to their folder and kept inside it (torch-free)
- `jsonfile`: JSON from files that may be crafted, every failure one error naming the file (torch-free)

This package itself imports nothing, so torch-free paths stay torch-free.
"""
