"""Plain PyTorch and matplotlib: the dataset, the Net, batching, the training loop, checkpoints, metrics and
figures. Importable without Prefect."""
