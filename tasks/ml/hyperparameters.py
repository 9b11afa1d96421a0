"""What decides a training's weights besides the data, the code and the device. Light to import."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fashion_pipeline.tasks.config import RunConfig


@dataclass(frozen=True)
class Hyperparameters:
    """Everything besides data, code and device that decides the trained weights."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    schedule: str
    seed: int
    validation_size: int = 0  # training images held out for validation (batches.validation_split)
    augment: bool = False  # random shifts and flips of the training images (batches.Augmentation)
    label_smoothing: float = 0.0

    @classmethod
    def of(cls, config: RunConfig) -> Hyperparameters:
        """The weights-deciding subset of a run's parameters."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})
