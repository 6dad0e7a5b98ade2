"""`wb demo`: the whole workbench on a real small model (run.py), with data it makes itself (data.py)."""
