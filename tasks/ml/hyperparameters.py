"""What decides a trained model besides the data, the code and the device. Light to import."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fashion_pipeline.tasks.config import RunConfig


@dataclass(frozen=True)
class Hyperparameters:
    """Everything besides data, code and device that decides the trained model: its weights, and how it predicts."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    schedule: str
    seed: int
    validation_size: int = 0  # training images held out for validation (batches.validation_split)
    weight_decay: float = 0.0
    augment: bool = False  # random shifts and flips of the training images (batches.Augmentation)
    augment_shift: int = 2  # the largest of those shifts, in pixels
    label_smoothing: float = 0.0
    # Validation and evaluation predict with the mean over each image and its mirror (model.log_probabilities).
    test_time_flip: bool = False

    @classmethod
    def of(cls, config: RunConfig) -> Hyperparameters:
        """The weights-deciding subset of a run's parameters."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})
