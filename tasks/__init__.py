"""The stages of the Fashion-MNIST pipeline: plain functions, each wrapped as a Prefect task."""
