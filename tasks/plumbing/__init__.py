"""What the stages stand on: files and manifests, TensorBoard files, progress, failures, locks, helper
processes, the Dask cluster, the local Prefect server."""
