"""Adapters applied to a model as it is read, and merge inputs' configs.

- `base`: the `MergeSource` protocol the merger applies an adapter through (`model+lora`)
- `lora`: PEFT LoRA and DoRA folders (`LoraAdapter`), read without peft
- `finetune`: full fine-tuned model folders read as float models (config.json)
"""
