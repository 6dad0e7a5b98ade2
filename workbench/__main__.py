"""`python -m workbench` is `wb` (what `accelerate launch -m workbench ...` runs)."""

from workbench.cli import main

main()
