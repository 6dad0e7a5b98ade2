"""`wb report`: one self-contained HTML file comparing base and fine-tuned models."""

from workbench.report.render import render_report

__all__ = ["render_report"]
