"""The Fashion-MNIST pipeline's stages, one module each, named as the Prefect UI names its task run.

download, inspect, graph, train, checkpoint, evaluate and report; `stage.py` is the decorator that
makes a work function a cached stage, `pipeline.py` runs the seven in order, `config.py` holds the
run's parameters. Plain PyTorch and matplotlib code is in `ml/`, the plumbing in `plumbing/`, the
sweep's plan and results in `sweep/`.
"""
