"""Sweeps: their plan, checked before any work, and their results."""
