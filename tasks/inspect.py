"""The inspect stage: what the data looks like, in TensorBoard's IMAGES and PROJECTOR tabs."""

from __future__ import annotations

from pathlib import Path

from fashion_pipeline.tasks.ml.dataset import CLASSES, fingerprint, load_split
from fashion_pipeline.tasks.plumbing.files import digest_json
from fashion_pipeline.tasks.plumbing.tensorboard_files import event_files, replacing_writer
from fashion_pipeline.tasks.stage import StageOutput, Written, stage

GRID_TAG = "four_fashion_mnist_images"
EMBEDDING_SIZE = 100


def inspection_output(dataset: Path, run_dir: str, seed: int, **_: object) -> StageOutput:
    """The inspection manifest in the run directory, and the digest of the data and seed it must match."""
    return Path(run_dir) / "inspect.json", {"inputs": digest_json([fingerprint(dataset), seed])}


@stage("inspect", output=inspection_output, code=("ml.dataset",))
def inspect(dataset: Path, run_dir: str, seed: int) -> Written:
    """Log a grid of 4 training images and a projector embedding of 100 random ones with their class names.

    Args:
        dataset: the dataset manifest.
        run_dir: the experiment's run directory (its TensorBoard run).
        seed: picks which images are shown.

    Returns:
        The event and projector files, and which images the grid shows.
    """
    import torch  # here, not at the top: a cached rerun never imports torch or torchvision
    from torchvision.utils import make_grid

    images, labels = load_split(dataset, "train")  # uint8 (N, 28, 28), (N,)
    generator = torch.Generator().manual_seed(seed)
    four = torch.randperm(len(images), generator=generator)[:4]
    sample = torch.randperm(len(images), generator=generator)[:EMBEDDING_SIZE]
    # Scaled to [0, 1]: the tutorial logged normalised [-1, 1] images, which show up black or not at all.
    as_float = lambda index: images[index].unsqueeze(1).float() / 255  # noqa: E731  (K, 1, 28, 28)
    with replacing_writer(Path(run_dir), "inspect") as writer:
        writer.add_image(GRID_TAG, make_grid(as_float(four)))  # (3, 32, 122)
        writer.add_embedding(
            images[sample].reshape(len(sample), -1).float(),  # (100, 784) raw pixels as features
            metadata=[CLASSES[label] for label in labels[sample]],
            label_img=as_float(sample),
        )
    projector = [path for path in Path(run_dir).glob("00000/default/*") if path.is_file()]
    files = event_files(Path(run_dir), "inspect") + projector + [Path(run_dir) / "projector_config.pbtxt"]
    return Written(files, {"grid_indices": four.tolist(), "embedding_size": len(sample)})
