"""`wb train`: LoRA supervised fine-tuning.

data.py (records -> conversations) -> templates.py (chat template) -> encode.py (input_ids + labels)
-> trainer.py (transformers.Trainer with guard rails) -> run.py (`train()`, the outputs in DIR).
checks.py warns about untrained template tokens, plot.py draws loss.svg, and launch.py re-launches
`wb train` through `accelerate launch` for several processes.
"""
