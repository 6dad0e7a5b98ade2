"""`wb train`: LoRA supervised fine-tuning.

data.py (records -> conversations) -> templates.py (chat template) -> encode.py (input_ids + labels)
-> trainer.py (transformers.Trainer with guard rails) -> run.py (`train()`: the stages data -> model
-> fit -> save, and the outputs in DIR; its docstring is the manual). checks.py warns about untrained
template tokens, launch.py re-launches `wb train` through `accelerate launch` for several processes;
loss.svg is drawn by workbench/report/svg.py, the report's own loss chart.
"""
