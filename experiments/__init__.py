"""Experiments: commands that drive `python -m train.main` runs and publish a comparison.

See experiments/README.md for each command, what it costs and what it writes.
"""
