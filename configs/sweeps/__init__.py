"""Sweep definitions (`get_sweep()`), run with `python -m launch.sweep run --sweep=configs/sweeps/NAME.py`."""
