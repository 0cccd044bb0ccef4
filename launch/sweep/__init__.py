"""Scaling sweeps: definitions, a claim-based runner, results, fits and plots (`python -m launch.sweep`)."""
