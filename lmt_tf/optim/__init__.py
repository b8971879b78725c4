"""Optimisation: gradient transforms (clipping, AGC) and the micro-batching train step."""
