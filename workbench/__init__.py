"""wb: the weight diff/merge & evaluation workbench."""

__version__ = "0.1.0"
