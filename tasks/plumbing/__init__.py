"""What the stages stand on: files and manifests, TensorBoard files, progress, failures, locks, helper processes, the local Prefect server."""
