"""Prefect flows of the Fashion-MNIST pipeline."""
