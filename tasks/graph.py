"""Graph stage: the model's graph in TensorBoard's GRAPHS tab."""

from __future__ import annotations

import warnings
from pathlib import Path

from tasks.caching import StageOutput, source_digest, stage_task
from tasks.events import event_files, replacing_writer
from tasks.files import read_manifest, write_manifest


def graph_output(run_dir: str, **_: object) -> StageOutput:
    """The graph manifest in the run directory, and the model code it must have been traced from."""
    return Path(run_dir) / "graph.json", {"code": GRAPH_CODE}


def log_graph(run_dir: str, refresh: bool = False) -> Path:
    """Trace the Net on one batch-shaped input and log its graph into the run directory.

    Args:
        run_dir: the experiment's run directory.
        refresh: log again even if the graph of this code is already there.

    Returns:
        The graph manifest.
    """
    manifest_path, facts = graph_output(run_dir)
    if not refresh and read_manifest(manifest_path, **facts):
        return manifest_path
    import torch  # here, not at the top: a cached rerun never imports torch

    from tasks import model

    net = model.build_model(model.MODEL_ARGS).eval()
    example = torch.zeros(4, 1, 28, 28)  # (B, 1, 28, 28): the trace needs shapes, not data
    with replacing_writer(Path(run_dir), "graph") as writer, warnings.catch_warnings():
        # add_graph traces with torch.jit, which warns that it is deprecated; the trace itself is what TensorBoard reads.
        warnings.simplefilter("ignore", FutureWarning)
        writer.add_graph(net, example)
    return write_manifest(manifest_path, event_files(Path(run_dir), "graph"), **facts)


GRAPH_CODE = source_digest("tasks.model", __name__)
graph_task = stage_task(log_graph, name="graph", output=graph_output, code=GRAPH_CODE)
