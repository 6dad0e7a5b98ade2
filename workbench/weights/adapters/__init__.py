"""What a merge source is: a PEFT LoRA adapter, or a full fine-tune taken as a task vector.

- `base`: the `MergeSource` protocol the merger works through, and `open_source` (path -> source)
- `lora`: PEFT LoRA folders (`LoraAdapter`), read without peft
- `finetune`: full fine-tuned model folders (`FineTune`), task vector model − base
"""
