"""Unit tests that take seconds and need no Prefect run: metrics against scikit-learn, code digests, manifests,
sweep planning."""

from __future__ import annotations

import inspect
import math
import os
import typing
from pathlib import Path

import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, precision_score, recall_score

from fashion_pipeline.tasks.ml.evaluation import average_precision, score
from fashion_pipeline.tasks.plumbing.files import read_manifest, write_manifest
from fashion_pipeline.tasks.stage import source_digest
from tests.helpers import REPO


def scores_with_ties(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) softmax outputs, a third of them saturated to exactly 1.0 as float32 does, and (N,) labels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 10, generator=generator) * 3
    logits[:100] *= 40  # saturates: many rows of exactly 1.0 and 0.0
    labels = torch.randint(0, 10, (300,), generator=generator)
    return torch.softmax(logits, dim=1), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_is_scikit_learns_with_tied_scores(seed: int) -> None:
    probabilities, labels = scores_with_ties(seed)
    assert (probabilities == 1.0).any(), "the case of interest: tied top scores"
    for index in range(10):
        expected = average_precision_score((labels == index).numpy(), probabilities[:, index].numpy())
        assert average_precision(probabilities[:, index], labels == index) == pytest.approx(expected, abs=1e-6)


def test_score_is_scikit_learns() -> None:
    probabilities, labels = scores_with_ties(3)
    predicted = probabilities.argmax(dim=1).numpy()
    metrics = score(probabilities, labels)
    assert metrics["confusion_matrix"] == confusion_matrix(labels.numpy(), predicted, labels=range(10)).tolist()
    precision = precision_score(labels.numpy(), predicted, average=None, labels=range(10), zero_division=0)
    recall = recall_score(labels.numpy(), predicted, average=None, labels=range(10), zero_division=0)
    assert list(metrics["per_class_precision"].values()) == pytest.approx(precision.tolist(), abs=1e-6)
    assert list(metrics["per_class_recall"].values()) == pytest.approx(recall.tolist(), abs=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(float((predicted == labels.numpy()).mean()))


MODULE = '''"""A module."""

def step(x):
    """Add one."""
    return x + 1  # the step
'''


@pytest.mark.parametrize(("variant", "same"), [
    (MODULE.replace("# the step", "# another comment"), True),
    (MODULE.replace('"""Add one."""', '"""Add one to x."""'), True),
    (MODULE.replace("x + 1  #", "x  +  1 #"), True),
    (MODULE.replace("x + 1", "x + 2"), False),
])
def test_source_digest_ignores_comments_docstrings_and_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              variant: str, same: bool) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "digest_a.py").write_text(MODULE)
    (tmp_path / "digest_b.py").write_text(variant)
    assert (source_digest("digest_a") == source_digest("digest_b")) is same


def test_manifest_verifies_its_files_and_facts(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"weights")
    manifest = write_manifest(tmp_path / "out.json", [data], step=3)
    assert list(read_manifest(manifest, step=3)["files"]) == ["data.bin"]
    assert read_manifest(manifest, step=4) is None  # another fact
    data.write_bytes(b"altered")
    assert read_manifest(manifest, step=3) is None  # a file that no longer matches
    data.unlink()
    assert read_manifest(manifest, step=3) is None


def test_sweep_plan_names_configurations_by_what_varies(tmp_path: Path) -> None:
    from fashion_pipeline.tasks.config import ConfigError
    from fashion_pipeline.tasks.sweep.plan import plan

    base = {"runs_dir": str(tmp_path / "runs"), "data_dir": str(tmp_path / "data"), "device": "cpu"}
    trials = plan("grid", base, grid={"lr": [0.01, 0.1], "batch_size": [4, 8]})
    assert [trial.name for trial in trials] == ["lr=0.01,batch_size=4", "lr=0.01,batch_size=8",
                                               "lr=0.1,batch_size=4", "lr=0.1,batch_size=8"]
    assert {trial.config.experiment for trial in trials} == {f"grid/{trial.name}" for trial in trials}
    with pytest.raises(ConfigError, match="are the same run"):
        plan("same", base, configurations=[{"lr": 0.01}, {"lr": 0.01}])
    with pytest.raises(ConfigError, match="runs_dir cannot vary within a sweep"):
        plan("fixed", base, configurations=[{"runs_dir": "elsewhere"}])


def test_flow_signature_is_run_config() -> None:
    from fashion_pipeline.flows.fashion import fashion
    from fashion_pipeline.tasks.config import RunConfig

    parameters, hints = inspect.signature(fashion.fn).parameters, typing.get_type_hints(fashion.fn)
    assert list(parameters) == list(RunConfig.model_fields)
    for name, field in RunConfig.model_fields.items():
        assert parameters[name].default == field.get_default(call_default_factory=True), name
        assert hints[name] == field.annotation, name


def test_presets_are_run_configs_that_options_override() -> None:
    from fashion_pipeline.flows.command_line import PRESETS, parse_command_line

    for name, settings in PRESETS.items():
        config = parse_command_line(["--preset", name, "--epochs", "3"]).config
        assert config.epochs == 3, name  # an explicit option wins
        assert all(getattr(config, key) == value for key, value in settings.items() if key != "epochs"), name


def test_stage_names_are_the_pipelines(tmp_path: Path) -> None:
    # --refresh validates against tasks/config.py STAGES, which must be the stages the pipeline runs, in order.
    from fashion_pipeline.tasks.config import STAGES, parse_config
    from fashion_pipeline.tasks.pipeline import run_pipeline

    class Recorder:
        states: dict[str, str] = {}
        called: list[str] = []

        def __call__(self, stage: typing.Any, **inputs: typing.Any) -> Path:
            self.called.append(stage.name)
            return tmp_path / f"{stage.name}.json"

    run = Recorder()
    run_pipeline(parse_config({"runs_dir": str(tmp_path)}), "cpu", None, run)  # type: ignore[arg-type]
    assert run.called == [*STAGES, "report"]


def test_validation_split_is_seeded_stratified_and_disjoint() -> None:
    from fashion_pipeline.tasks.ml.batches import validation_split

    labels = torch.arange(1000) % 10
    labels[:100] = 0  # an uneven class mix: class 0 holds 19% of the images
    kept, held = validation_split(labels, 100, seed=3)
    again_kept, again_held = validation_split(labels, 100, seed=3)
    assert torch.equal(kept, again_kept) and torch.equal(held, again_held)  # deterministic
    assert not torch.equal(held, validation_split(labels, 100, seed=4)[1])  # and seeded
    assert len(held) == 100 and len(kept) == 900 and not set(kept.tolist()) & set(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(1000))
    assert torch.bincount(labels[held]).tolist() == [19] + [9] * 9  # the training set's mix


def test_sweep_selects_on_validation_not_test() -> None:
    from fashion_pipeline.tasks.sweep.results import summarise

    entries = [
        {"name": "a", "state": "Completed", "validation_accuracy": 0.80, "test_accuracy": 0.90},
        {"name": "b", "state": "Completed", "validation_accuracy": 0.85, "test_accuracy": 0.70},
        {"name": "c", "state": "Failed", "error": "train: ..."},
    ]
    trials = [type("Trial", (), {"config": type("Config", (), {"runs_dir": "runs"})(), "values": {"lr": 0.1}})()]
    summary = summarise("s", trials, entries)
    assert summary["best"]["name"] == "b" and summary["best"]["test_accuracy"] == 0.70
    assert (summary["completed"], summary["failed"]) == (2, 1)


def test_sweep_without_validation_is_refused(tmp_path: Path) -> None:
    from fashion_pipeline.tasks.config import ConfigError
    from fashion_pipeline.tasks.sweep.plan import plan

    with pytest.raises(ConfigError, match="--validation-size 0: a sweep picks its best configuration on held-out"):
        plan("s", {"runs_dir": str(tmp_path), "validation_size": 0}, grid={"lr": [0.01, 0.1]})


def test_sweep_command_without_validation_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    from fashion_pipeline.flows.sweep_command_line import main

    status = main(["--grid", '{"lr": [0.01, 0.1]}', "--validation-size", "0", "--runs-dir", str(tmp_path / "runs"),
                   "--data-dir", str(tmp_path / "data")])
    assert status == 2
    assert capsys.readouterr().err.startswith("sweep.py: error: --validation-size 0: a sweep picks its best")
    assert not any(tmp_path.iterdir())  # nothing trained, downloaded or created


def test_halving_rungs_promotion_and_refusals(tmp_path: Path) -> None:
    from fashion_pipeline.tasks.config import ConfigError
    from fashion_pipeline.tasks.sweep.plan import plan, rung_epochs
    from fashion_pipeline.tasks.sweep.results import promote

    assert rung_epochs(4, 2) == [1, 2, 4] and rung_epochs(15, 3) == [1, 5, 15] and rung_epochs(3, None) == [3]
    entries = [{"name": name, "state": "Completed", "validation_accuracy": accuracy}
               for name, accuracy in (("a", 0.5), ("b", 0.9), ("c", 0.7), ("d", 0.9))]
    assert promote(entries, 2) == ["b", "d"] and promote(entries[:1], 2) == ["a"]
    base = {"runs_dir": str(tmp_path), "epochs": 2}
    with pytest.raises(ConfigError, match="uses the onecycle schedule, which depends on the epoch count"):
        plan("h", base, configurations=[{"lr": 0.1}, {"schedule": "onecycle"}], halving=2)
    with pytest.raises(ConfigError, match="give every configuration the same --epochs"):
        plan("h", base, configurations=[{"lr": 0.1}, {"epochs": 4}], halving=2)
    with pytest.raises(ConfigError, match="one rung only"):
        plan("h", base | {"epochs": 1}, grid={"lr": [0.1, 0.2]}, halving=2)


def test_augmentation_shifts_and_flips_reproducibly() -> None:
    from fashion_pipeline.tasks.ml.batches import Augmentation

    images = torch.arange(4 * 28 * 28, dtype=torch.int64).reshape(4, 28, 28).remainder(251).to(torch.uint8)
    first, second = Augmentation(seed=1), Augmentation(seed=1)
    state = first.state()
    out = first(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, second(images))  # the same seed draws the same
    first.restore(state)
    assert torch.equal(out, first(images))  # and a restored state draws them again
    for original, shifted in zip(images, out):  # each image is itself moved by at most 2 pixels, maybe mirrored
        assert any(torch.equal(candidate[2:-2, 2:-2], shifted[2 + dy:26 + dy, 2 + dx:26 + dx])
                   for candidate in (original, original.flip(1)) for dy in range(-2, 3) for dx in range(-2, 3))


def test_flip_only_augmentation_mirrors_about_half_and_shifts_none() -> None:
    from fashion_pipeline.tasks.ml.batches import Augmentation

    images = torch.randint(0, 256, (64, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    first, second = Augmentation(seed=3, shift=0), Augmentation(seed=3, shift=0)
    out = first(images)
    assert torch.equal(out, second(images))  # seeded
    mirrored = [torch.equal(after, before.flip(1)) for before, after in zip(images, out)]
    assert all(m or torch.equal(after, before) for m, before, after in zip(mirrored, images, out))
    assert 16 <= sum(mirrored) <= 48


def test_predictions_figure_shows_the_augmented_images_trained_on(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from fashion_pipeline.tasks.ml import training_loop
    from fashion_pipeline.tasks.ml.batches import Augmentation, SeededOrder
    from fashion_pipeline.tasks.ml.checkpoints import CheckpointStore
    from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters

    logged: dict[int, object] = {}

    class RecordingFigures:  # the figure process's interface; what matters here is which images it is given
        def __init__(self, *args: object) -> None: ...
        def log(self, step: int, images: object, *rest: object) -> None: logged[step] = images
        def flush(self) -> None: ...
        def close(self) -> None: ...

    monkeypatch.setattr(training_loop, "FigureWorker", RecordingFigures)
    images = torch.randint(0, 256, (32, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    hyperparameters = Hyperparameters(epochs=1, batch_size=4, lr=0.01, momentum=0.9, optimizer="sgd",
                                      schedule="constant", seed=5, augment=True)
    loop = training_loop.TrainingLoop(hyperparameters, "cpu", len(images))
    with SummaryWriter(str(tmp_path)) as writer:
        loop.run(images, labels, writer, CheckpointStore(tmp_path / "checkpoints"), log_every=3, checkpoint_every=100)
    # Replayed: the epoch's order, and the augmentation drawn batch by batch.
    order, augment = SeededOrder(len(images), seed=5).next_epoch(), Augmentation(seed=5)
    trained = [augment(images[order[batch * 4:(batch + 1) * 4]]) for batch in range(8)]
    assert sorted(logged) == [3, 6]
    for step, shown in logged.items():
        assert torch.equal(torch.from_numpy(shown), trained[step - 1])
        assert not torch.equal(torch.from_numpy(shown), images[order[(step - 1) * 4:step * 4]])


def test_test_time_flip_predicts_the_mean_over_an_image_and_its_mirror() -> None:
    from fashion_pipeline.tasks.ml.model import MODEL_ARGS, build_model, log_probabilities

    net = build_model(MODEL_ARGS, seed=0).eval()
    inputs = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = log_probabilities(net, inputs)
        both = log_probabilities(net, inputs, mirrored=True)
        expected = (torch.softmax(net(inputs), 1) + torch.softmax(net(inputs.flip(3)), 1)) / 2
        assert torch.allclose(plain.exp(), torch.softmax(net(inputs), 1), atol=1e-6)
        assert torch.allclose(both.exp(), expected, atol=1e-6) and not torch.allclose(both, plain, atol=1e-3)
        # so an image and its mirror image get the same prediction
        assert torch.allclose(log_probabilities(net, inputs.flip(3), mirrored=True), both, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_shrinks_the_weights_of_a_step_without_gradient(optimizer: str) -> None:
    from fashion_pipeline.tasks.config import RunConfig
    from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
    from fashion_pipeline.tasks.ml.training_loop import TrainingLoop

    hp = Hyperparameters.of(RunConfig.model_construct(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=0.01))
    loop = TrainingLoop(hp, "cpu", size=64)
    before = [parameter.detach().clone() for parameter in loop.model.parameters()]
    for parameter in loop.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    loop.optimizer.step()
    # SGD's L2 term adds wd * w to the gradient, a step of lr * wd * w; Adam's decoupled decay shrinks
    # by the same lr * wd, where an Adam step of L2 would move each weight by about lr.
    for old, new in zip(before, loop.model.parameters()):
        assert torch.allclose(new.detach(), old * (1 - 0.1 * 0.01), atol=1e-7)


def test_training_on_an_accelerator_is_tagged_with_its_device_type() -> None:
    from fashion_pipeline.tasks.pipeline import accelerator_tag

    assert accelerator_tag("cuda:1") == ("cuda",) and accelerator_tag("mps") == ("mps",) and accelerator_tag("cpu") == ()


def test_ml_code_imports_without_prefect() -> None:
    # tasks/ml is plain PyTorch and matplotlib: a notebook or another orchestrator can use it as it is.
    import subprocess
    import sys

    modules = sorted(f"fashion_pipeline.tasks.ml.{path.stem}" for path in (REPO / "tasks" / "ml").glob("[!_]*.py"))
    code = ("import sys; sys.modules['prefect'] = None  # any import of Prefect now fails\n"
            f"import importlib; [importlib.import_module(name) for name in {modules!r}]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) >= 9


def test_stage_decorator_owns_the_manifest_protocol(tmp_path: Path) -> None:
    # The work runs only when its manifest does not vouch for these inputs; no Prefect run is needed.
    from fashion_pipeline.tasks.stage import Written, stage

    calls: list[int] = []

    def output(folder: str, value: int, **_: object) -> tuple[Path, dict]:
        return Path(folder) / "out.json", {"value": value}

    @stage("example", output=output)
    def example(folder: str, value: int) -> Written:
        calls.append(value)
        path = Path(folder) / "result.txt"
        path.write_text(str(value))
        return Written([path], {"length": 1})

    manifest = example(str(tmp_path), 1)
    assert read_manifest(manifest, value=1, code=example.code, length=1) is not None
    assert example(str(tmp_path), value=1) == manifest and calls == [1]  # vouched for: no work
    example(str(tmp_path), 2)  # other inputs than the manifest records
    (tmp_path / "result.txt").write_text("altered")
    example(str(tmp_path), 2)  # a file altered since
    example(str(tmp_path), 2, refresh=True)
    assert calls == [1, 2, 2, 2]
    assert example.task.name == "example" and list(inspect.signature(example.task.fn).parameters) == [
        "folder", "value", "refresh"]


def test_a_container_cpu_limit_sizes_the_local_cluster_and_the_training_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fashion_pipeline.tasks.ml import devices
    from fashion_pipeline.tasks.plumbing.dask_cluster import local_runner

    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(devices, "CGROUP_V2_MAX", cpu_max)
    monkeypatch.setattr(devices, "CGROUP_V1_QUOTA", tmp_path / "absent")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    affinity = len(os.sched_getaffinity(0))
    for text, limit in (("max 100000", None), ("100000 100000", 1.0), ("50000 100000", 0.5), ("150000 100000", 1.5)):
        cpu_max.write_text(text + "\n")
        assert devices.cgroup_cpu_limit() == limit
        expected = affinity if limit is None else max(1, min(affinity, math.ceil(limit)))
        assert devices.usable_cores() == devices.cpu_threads(64) == expected
    cpu_max.write_text("100000 100000\n")  # a pod with limits.cpu 1, on a node with more cores
    cluster = local_runner().cluster_kwargs
    assert cluster["n_workers"] == 1 and cluster["env"]["OMP_NUM_THREADS"] == "1"
    cpu_max.unlink()  # cgroup v1: quota -1 is no limit
    monkeypatch.setattr(devices, "CGROUP_V1_QUOTA", tmp_path / "quota")
    monkeypatch.setattr(devices, "CGROUP_V1_PERIOD", tmp_path / "period")
    (tmp_path / "quota").write_text("-1\n")
    (tmp_path / "period").write_text("100000\n")
    assert devices.cgroup_cpu_limit() is None
    (tmp_path / "quota").write_text("100000\n")
    assert devices.usable_cores() == 1


@pytest.mark.parametrize(("batches_per_epoch", "expected"), [(15000, 1000), (938, 93), (469, 46), (5, 1)])
def test_the_default_log_every_gives_every_training_a_loss_curve(batches_per_epoch: int, expected: int) -> None:
    from fashion_pipeline.tasks.ml.training_loop import default_log_every

    assert default_log_every(batches_per_epoch) == expected


def test_progress_shows_a_loss_once_never_a_stale_one(caplog: pytest.LogCaptureFixture) -> None:
    from fashion_pipeline.tasks.plumbing.progress import StepProgress

    progress = StepProgress("train", total=100, every_seconds=0)
    with caplog.at_level("INFO", logger="fashion"):
        progress.note(loss=0.4945)
        progress.advance(10)
        progress.advance(10)  # no window ended since the last line
    assert [record.getMessage() for record in caplog.records] == [
        "train: 10/100 steps (10%) loss 0.4945", "train: 20/100 steps (20%)"]


def test_the_summary_legend_names_every_marker_it_draws() -> None:
    import numpy as np

    from fashion_pipeline.tasks.ml.figures import summary_figure

    figure = summary_figure([(10, 1.0), (20, 0.8)], {"T-shirt/top": (np.array([1.0, 0.5]), np.array([0.0, 1.0]))},
                            np.eye(1, dtype=int), "tiny", validation_loss=[(20, 0.9)], validation_accuracy=[(20, 0.7)])
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["training", "validation", "validation accuracy"]
    assert [handle.get_marker() for handle in legend.legend_handles] == ["o", "s", "^"]
