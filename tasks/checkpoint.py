"""The checkpoint stage: the finished training's final checkpoint, exported for inference as a lean `model.pt`."""

from __future__ import annotations

import json
from pathlib import Path

from fashion_pipeline.tasks.ml.checkpoints import MODEL_KEYS, load_checkpoint, save_file
from fashion_pipeline.tasks.plumbing.files import sha256_file
from fashion_pipeline.tasks.stage import StageOutput, Written, stage


def model_output(training: Path, **_: object) -> StageOutput:
    """The exported model's manifest, beside the training it comes from, and that training's digest."""
    return Path(training).parent / "model.json", {"training": sha256_file(Path(training))}


@stage("checkpoint", output=model_output, code=("ml.checkpoints",))
def checkpoint(training: Path) -> Written:
    """Save the finished training's model as `model.pt`, self-describing and lean: what inference needs.

    Args:
        training: the training manifest, naming the final checkpoint.

    Returns:
        `model.pt`, which holds its format, the model's state and arguments, the hyperparameters, the
        epoch count, the final step and the training's final metrics (its loss at the last log
        point); evaluation needs nothing else. The optimizer's state stays in the training's checkpoints.
    """
    trained = json.loads(Path(training).read_text())
    final = load_checkpoint(Path(training).parent / trained["checkpoint"])
    exported = {key: final[key] for key in MODEL_KEYS if key != "metrics"}
    exported["metrics"] = {"training_loss": trained.get("training_loss"), "global_step": final["global_step"]}
    model_path = save_file(exported, Path(training).parent / "model.pt")
    return Written([model_path], {"model": model_path.name, "global_step": final["global_step"]})
