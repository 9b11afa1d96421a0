"""The graph stage: the model's graph in TensorBoard's GRAPHS tab."""

from __future__ import annotations

import warnings
from pathlib import Path

from fashion_pipeline.tasks.plumbing.tensorboard_files import event_files, replacing_writer
from fashion_pipeline.tasks.stage import StageOutput, Written, stage


def graph_output(run_dir: str, **_: object) -> StageOutput:
    """The graph manifest in the run directory; the stage's code, the Net's included, is all it depends on."""
    return Path(run_dir) / "graph.json", {}


@stage("graph", output=graph_output, code=("ml.model",))
def graph(run_dir: str) -> Written:
    """Trace the Net on one batch-shaped input and log its graph into the run directory.

    Args:
        run_dir: the experiment's run directory.

    Returns:
        The graph's event file.
    """
    import torch  # here, not at the top: a cached rerun never imports torch

    from fashion_pipeline.tasks.ml import model

    net = model.build_model(model.MODEL_ARGS).eval()
    example = torch.zeros(4, 1, 28, 28)  # (B, 1, 28, 28): the trace needs shapes, not data
    with replacing_writer(Path(run_dir), "graph") as writer, warnings.catch_warnings():
        # add_graph traces with torch.jit, which warns that it is deprecated; the trace itself is what TensorBoard reads.
        warnings.simplefilter("ignore", FutureWarning)
        writer.add_graph(net, example)
    return Written(event_files(Path(run_dir), "graph"))
