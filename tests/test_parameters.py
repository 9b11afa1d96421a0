"""Bad parameters stop with a one-line error and exit status 2 before any stage runs, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fashion_pipeline.flows.command_line import build_parser, main
from fashion_pipeline.tasks.config import STAGES, RunConfig
from tests.helpers import run_flow_script

BAD = {
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "zero batch size": (["--batch-size", "0"], "--batch-size"),
    "negative learning rate": (["--lr", "-0.1"], "--lr"),
    "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
    "experiment escaping upwards": (["--experiment", "../x"], "inside the runs dir"),
    "absolute experiment": (["--experiment", "/tmp/x"], "inside the runs dir"),
    "data dir is a file": (["--data-dir", "a-file"], "is a file, not a folder"),
    "unknown refresh stage": (["--refresh", "training"], "unknown stage(s) training"),
    "not a number": (["--epochs", "two"], "--epochs"),
    "missing mirror folder": (["--mirror", "no-such-folder"], "neither an http(s) URL nor an existing folder"),
    "runs dir in /proc": (["--runs-dir", "/proc/x"], "--runs-dir '/proc/x' cannot be created: '/proc' cannot hold files"),
    "data dir in /sys": (["--data-dir", "/sys/x"], "--data-dir '/sys/x' cannot be created: '/sys' cannot hold files"),
    "runs dir below a file": (["--runs-dir", "/dev/null/x"], "it would be below '/dev/null', which is a file"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_parameter_exits_2_with_one_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fashion.py: error: ") and message in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_script_exit_status_and_help(tmp_path: Path) -> None:
    failed = run_flow_script("--epochs", "0", cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == ["fashion.py: error: --epochs: input should be greater than or equal to 1 (got '0')"]
    assert list(tmp_path.iterdir()) == []
    help_text = build_parser().format_help()
    for name in RunConfig.model_fields:
        assert "--" + name.replace("_", "-") in help_text
    assert all(stage in help_text for stage in STAGES)


def test_torchvision_constants_match() -> None:
    from torchvision.datasets import FashionMNIST

    from fashion_pipeline.tasks.download import OFFICIAL_FILES
    from fashion_pipeline.tasks.ml.dataset import CLASSES

    assert CLASSES == tuple(FashionMNIST.classes)
    assert OFFICIAL_FILES == dict(FashionMNIST.resources)


def test_defaults_are_the_tutorials() -> None:
    config = RunConfig()
    assert (config.epochs, config.batch_size, config.lr, config.momentum, config.optimizer) == (1, 4, 0.001, 0.9, "sgd")
    assert (config.experiment, config.runs_dir, config.data_dir, config.log_every) == ("fashion_mnist_experiment_1", "runs", "data", None)
