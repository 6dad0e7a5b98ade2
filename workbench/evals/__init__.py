"""The pieces of `wb eval`; `workbench.evals.run.evaluate` ties them together.

- `layouts`: MMLU / C-Eval / CMMLU CSV folders (as their official releases unpack), read and checked
  with the `csv` module; which benchmark a folder holds is named (`NAME=DIR`), else the tasks asked
  for tell, else its layout (`resolve_data_dirs`);
- `tasks`: lm-eval's own tasks and groups, online or reading those folders;
- `gendata`, `generate`, `genmetrics`: prompt/reference records, batched greedy generation, ROUGE/BLEU.

`layouts`, `gendata` and `genmetrics` are plain Python; lm-eval is imported only when tasks are built.
"""
