"""What a merge source is: a PEFT LoRA adapter, or a full fine-tune taken as a task vector."""
