"""Experiment tracking: Weights & Biases (offline by default) and run-directory reports."""
