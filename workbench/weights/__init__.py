"""Per-tensor weight work: checksum, verify, diff, recover, merge (and its methods), adapters, GGUF import.

Every command here streams checkpoints through `workbench.io` one tensor (or row block) at a time
and imports neither transformers nor peft (GGUF import, which needs transformers, aside).
"""
