"""The pieces of `wb eval`; `workbench.evaluate.evaluate` ties them together.

- `layouts`: MMLU / C-Eval / CMMLU CSV folders, read and checked with the `csv` module;
- `tasks`: lm-eval's own tasks and groups, online or reading those folders;
- `gendata`, `generate`, `genmetrics`: prompt/reference records, batched greedy generation, ROUGE/BLEU.

`layouts`, `gendata` and `genmetrics` are plain Python; lm-eval is imported only when tasks are built.
"""
