"""The run's parameters: one validated set shared by the flow, the command line and the deployment."""

from __future__ import annotations

import errno
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.files import nearest_existing

STAGES = ("download", "inspect", "graph", "train", "checkpoint", "evaluate")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Each parameter's type, bounds and help text live here once; the flow's signature and
# RunConfig both use these aliases, so the CLI, the flow and the deployment schema agree.
Experiment = Annotated[str, Field(min_length=1, description="Name of the run directory under --runs-dir.")]
RunsDir = Annotated[str, Field(min_length=1, description="Folder that holds one TensorBoard run per experiment: a path "
                                                         "or a store URL (s3://bucket/runs, gs://..., file://...).")]
DataDir = Annotated[str, Field(min_length=1, description="Folder for the Fashion-MNIST files and their decoded cache: a "
                                                         "path or a store URL.")]
Epochs = Annotated[int, Field(ge=1, le=1000, description="Passes over the training set.")]
BatchSize = Annotated[int, Field(ge=1, le=65536, description="Training images per optimizer step.")]
LearningRate = Annotated[float, Field(gt=0, le=10, description="Learning rate (the one-cycle peak with --schedule onecycle).")]
Momentum = Annotated[float, Field(ge=0, lt=1, description="SGD momentum, or Adam's beta1.")]
Optimizer = Annotated[Literal["sgd", "adam"], Field(description="Optimizer: the tutorial's SGD, or Adam.")]
Schedule = Annotated[Literal["constant", "onecycle"], Field(description="Learning-rate schedule.")]
LogEvery = Annotated[int | None, Field(ge=1, description=(
    "Steps between 'training loss' points and prediction figures. (default: 1000, or an epoch's steps / 10 where "
    "that is fewer, so that every training has a loss curve)"))]
CheckpointEvery = Annotated[int, Field(ge=1, description="Steps between checkpoints (one is also written at each epoch's end).")]
WeightDecay = Annotated[float, Field(ge=0, lt=1, description="Weight decay: L2 for SGD, decoupled (as AdamW's) "
                                                              "for Adam.")]
Augment = Annotated[bool, Field(description="Shift each training image by up to --augment-shift pixels and flip half "
                                            "of them, drawn from a seeded generator.")]
AugmentShift = Annotated[int, Field(ge=0, le=8, description="The largest shift of --augment, in pixels "
                                                             "(0: flips only).")]
TestTimeFlip = Annotated[bool, Field(description="Predict, in validation and on the test set, with the mean of the "
                                                 "class probabilities of each image and of its mirror image.")]
LabelSmoothing = Annotated[float, Field(ge=0, lt=1, description="Label smoothing of the training loss.")]
ValidationSize = Annotated[int, Field(ge=0, le=30000, description=(
    "Training images held out, stratified by class and seeded, to validate on at each epoch's end (0: none; "
    "sweeps: 5000)."))]
Seed = Annotated[int, Field(ge=0, lt=2**31, description="Seed for the model's initial weights, the data order and the samples shown.")]
Device = Annotated[str, Field(description="Where to train: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
Mirror = Annotated[
    str | None,
    Field(description="An http(s) URL or a local folder holding the four official .gz files, used instead of the official mirrors "
          "(default: env FASHION_MNIST_MIRROR)."),
]
Refresh = Annotated[
    list[str],
    Field(description=f"Stages to recompute even when cached: 'all' or any of {', '.join(STAGES)}."),
]


class ConfigError(ValueError):
    """A parameter value that the run cannot use; its message is one line naming the value."""


class RunConfig(BaseModel):
    """Every parameter of one run of the Fashion-MNIST pipeline, checked together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: Experiment = "fashion_mnist_experiment_1"
    runs_dir: RunsDir = "runs"
    data_dir: DataDir = "data"
    epochs: Epochs = 1
    batch_size: BatchSize = 4
    lr: LearningRate = 0.001
    momentum: Momentum = 0.9
    optimizer: Optimizer = "sgd"
    schedule: Schedule = "constant"
    log_every: LogEvery = None
    checkpoint_every: CheckpointEvery = 2000
    seed: Seed = 0
    validation_size: ValidationSize = 0
    weight_decay: WeightDecay = 0.0
    augment: Augment = False
    augment_shift: AugmentShift = 2
    label_smoothing: LabelSmoothing = 0.0
    test_time_flip: TestTimeFlip = False
    device: Device = "auto"
    mirror: Mirror = None
    refresh: Refresh = Field(default_factory=list)

    @field_validator("experiment")
    @classmethod
    def _stays_inside_runs_dir(cls, name: str) -> str:
        if not name.strip():
            raise ValueError(f"{name!r} is blank; give the run directory a name")
        if name != name.strip():
            raise ValueError(f"{name!r} starts or ends with whitespace, which shells and folders hide")
        if any(unicodedata.category(character) == "Cc" for character in name):
            raise ValueError(f"{name!r} holds control characters")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or name.startswith("~"):
            raise ValueError(f"{name!r} must be a relative name inside the runs dir, without '..'")
        return name

    @field_validator("runs_dir", "data_dir")
    @classmethod
    def _plain_location(cls, location: str) -> str:
        return storage.plain(location)  # file:///x is the folder /x: the fast path

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
        return device

    @field_validator("mirror")
    @classmethod
    def _usable_mirror(cls, mirror: str | None) -> str | None:
        if mirror is None or mirror == "":
            return None
        if is_url(mirror) or os.path.isdir(mirror):
            return mirror
        raise ValueError(f"{mirror!r} is neither an http(s) URL nor an existing folder")

    @field_validator("refresh")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        unknown = sorted(set(stages) - set(STAGES) - {"all"})
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose all or any of {', '.join(STAGES)}")
        return list(STAGES) if "all" in stages else sorted(set(stages), key=STAGES.index)

    @model_validator(mode="after")
    def _folders_usable(self) -> RunConfig:
        for flag, folder in (("--data-dir", self.data_dir), ("--runs-dir", self.runs_dir)):
            if storage.is_remote(folder):
                try:
                    storage.check(folder)
                except storage.StoreError as error:
                    raise ValueError(f"{flag} {folder}: {error}") from None
                continue
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise ValueError(f"{flag} {folder!r} is a file, not a folder")
            if problem := _unwritable(Path(folder)):
                raise ValueError(f"{flag} {folder!r} {problem}")
        if storage.is_remote(self.runs_dir):
            return self
        limit = _name_limit(nearest_existing(Path(self.runs_dir)))
        if longest := max((part for part in Path(self.experiment).parts if len(part.encode()) > limit), default=None):
            raise ValueError(f"--experiment: {longest[:20]!r}... is {len(longest.encode())} bytes long, more than a "
                             f"file name may be here ({limit}); choose a shorter name")
        run = Path(self.experiment)
        if any(os.path.isfile(Path(self.runs_dir) / run.parents[i]) for i in range(len(run.parents))):
            raise ValueError(f"--experiment {self.experiment!r} would put the run directory below a file")
        return self

    @property
    def run_dir(self) -> str:
        """The experiment's run directory, `<runs-dir>/<experiment>`: a path, or a URL in a store."""
        return storage.join(self.runs_dir, self.experiment)

    @property
    def source(self) -> str | None:
        """Where the dataset comes from: --mirror, else env FASHION_MNIST_MIRROR, else the official mirrors."""
        return self.mirror or os.environ.get("FASHION_MNIST_MIRROR") or None


def _unwritable(folder: Path) -> str | None:
    """Why this process cannot write into `folder` (or create it), as the end of a sentence; None if it can.

    Tried, not guessed from permission bits: a folder is made and removed where the first missing one
    would go. Root passes every permission check, yet /proc, /sys and read-only mounts refuse it.
    """
    nearest = nearest_existing(folder)
    where = "" if nearest == folder.absolute() else f"cannot be created: {str(nearest)!r} "
    if not nearest.is_dir():
        return f"cannot be created: it would be below {str(nearest)!r}, which is a file; choose another folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=nearest, prefix=".fashion-probe-"))
    except OSError as error:
        if error.errno == errno.EROFS or os.statvfs(nearest).f_flag & os.ST_RDONLY:
            reason = "is on a read-only file system"
        elif error.errno in (errno.EACCES, errno.EPERM) and not os.access(nearest, os.W_OK | os.X_OK):
            reason = "is not writable by this user"
        else:  # /proc, /sys and their kind: no permission would let a file in
            reason = "cannot hold files"
        return f"{where}{reason}; choose another folder"
    return None


def _name_limit(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of `folder` allows."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def is_url(mirror: str) -> bool:
    """Whether a mirror is an http(s) URL; otherwise it is a local folder."""
    return mirror.startswith(("http://", "https://"))


def documented_parameters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Append an `Args:` section built from RunConfig's field descriptions to `fn`'s docstring.

    Prefect reads parameter descriptions from that section for the deployment's parameter schema and
    the UI's run form; this keeps the descriptions written once, in RunConfig.
    """
    lines = [f"    {name}: {field.description}" for name, field in RunConfig.model_fields.items()]
    fn.__doc__ = f"{fn.__doc__ or ''}\n\nArgs:\n" + "\n".join(lines)
    return fn


def parse_config(values: dict) -> RunConfig:
    """Validate `values` into a RunConfig, turning pydantic's report into one ConfigError line."""
    try:
        return RunConfig(**values)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        flag = f"--{field.replace('_', '-')}: " if field else ""
        message = first["msg"].removeprefix("Value error, ")
        named = not field or isinstance(first["input"], dict) or repr(first["input"]) in message
        given = "" if named else f" (got {first['input']!r})"
        raise ConfigError(f"{flag}{message[:1].lower()}{message[1:]}{given}") from None
