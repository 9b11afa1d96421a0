"""Failure paths: a permanent error fails once, at once, in one line, and leaves nothing half-written.

Each command-line case asserts the exit status, the last line of stderr, how often the flow began,
and what is left in the run folder. The full-disk and read-only cases need real small file systems
(tmpfs), which only root can mount: they skip, saying so, otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashion_pipeline.flows.sweep_command_line import main as sweep_main
from fashion_pipeline.tasks.config import ConfigError
from fashion_pipeline.tasks.download import DatasetChecksumError, DatasetDownloadError, download
from fashion_pipeline.tasks.ml.checkpoints import load_checkpoint
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.plumbing.failures import RunFailed, TransientError, exit_status, is_permanent, one_line
from fashion_pipeline.tasks.plumbing.faults import InjectedFault
from fashion_pipeline.tasks.plumbing.lock import ExperimentBusyError
from fashion_pipeline.tasks.sweep.plan import plan
from fashion_pipeline.tasks.train import training_dir
from tests.helpers import FLOW_SCRIPT, TINY, VALIDATION, final_weights, same_weights, stop_local_server, tiny_args
from tests.mirror import serve_mirror

ROOT = os.geteuid() == 0


# --- the classification ----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    DatasetChecksumError("x.gz: md5 1 does not match the expected 2"), ConfigError("--lr: bad"),
    ExperimentBusyError("busy"), OSError(errno.ENOSPC, "No space left on device", "f"),
    OSError(errno.EROFS, "Read-only file system", "f"), PermissionError(errno.EACCES, "Permission denied", "f"),
    OSError(errno.ENAMETOOLONG, "File name too long", "f"),
])
def test_permanent_failures(error: BaseException) -> None:
    assert is_permanent(error)
    wrapped = RunFailed(one_line(error))
    wrapped.__cause__ = error
    assert is_permanent(wrapped)


@pytest.mark.parametrize("error", [
    DatasetDownloadError("HTTP Error 503"), TransientError("the figure process exited"), InjectedFault("fault"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset"), RuntimeError("anything else"),
])
def test_transient_failures(error: BaseException) -> None:
    assert not is_permanent(error)


def test_one_line_says_what_where_and_what_to_do() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "runs/x/step-00000015.pt")
    assert one_line(full) == ("No space left on device: runs/x/step-00000015.pt: free some space there and run "
                              "again: the run resumes where it stopped")
    assert one_line(ValueError("a\nb")) == "ValueError: a b"  # unexpected: its type says what it is
    assert one_line(DatasetDownloadError("downloading failed: 503")) == "downloading failed: 503"
    wrapped = RunFailed("--lr: bad")
    wrapped.__cause__ = ConfigError("--lr: bad")
    assert exit_status(wrapped) == 2 and exit_status(RunFailed("disk")) == 1


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture
def home(synthetic_mirror: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Prefect home of the test's own, the synthetic data's md5s expected; its local server stopped at the end."""
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    yield environment | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    stop_local_server(tmp_path / "prefect-home")


def run_flow(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FLOW_SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_failed(done: subprocess.CompletedProcess, status: int, last_line: str, flow_runs: int) -> None:
    """Exit `status`, stderr ending in `last_line`, the flow begun `flow_runs` times, at most one traceback."""
    assert done.returncode == status, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == last_line, done.stderr[-3000:]
    assert done.stderr.count("Beginning flow run") == flow_runs, done.stderr[-3000:]
    assert done.stderr.count("Traceback") <= 1, done.stderr


def leftovers(folder: Path) -> list[str]:
    """Every file under `folder`, relative to it."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def truncated_mirror(source: Path, folder: Path, name: str) -> Path:
    folder.mkdir()
    for gz in source.glob("*"):
        data = gz.read_bytes()
        (folder / gz.name).write_bytes(data[: len(data) // 2] if gz.name == name else data)
    return folder


LABELS = "t10k-labels-idx1-ubyte.gz"
GETS_PER_FILE = 2  # torchvision probes each URL for redirects with a GET, then downloads it


@pytest.mark.slow
def test_truncated_file_in_a_mirror_folder(home: dict[str, str], synthetic_mirror: Path, tmp_path: Path) -> None:
    mirror = truncated_mirror(synthetic_mirror, tmp_path / "mirror", LABELS)
    done = run_flow(*tiny_args(), "--mirror", str(mirror), env=home, cwd=tmp_path)
    expected = json.loads((synthetic_mirror / "checksums.json").read_text())[LABELS]
    assert_failed(done, 1, f"fashion.py: error: {mirror / LABELS}: md5 {md5_of(mirror / LABELS)} does not match the "
                           f"expected {expected}: replace it with the official file", flow_runs=1)
    assert not (tmp_path / "runs").exists()  # no .lock, no empty run folder
    assert not list((tmp_path / "data").rglob("dataset.json"))


@pytest.mark.slow
def test_truncated_file_on_an_http_mirror(home: dict[str, str], synthetic_mirror: Path, tmp_path: Path) -> None:
    mirror = truncated_mirror(synthetic_mirror, tmp_path / "mirror", LABELS)
    with serve_mirror(mirror) as (url, gets):
        done = run_flow(*tiny_args(), "--mirror", url, env=home, cwd=tmp_path)
    assert done.stderr.strip().splitlines()[-1].endswith("the mirror serves another file; use another mirror")
    assert_failed(done, 1, done.stderr.strip().splitlines()[-1], flow_runs=1)
    assert gets[f"/{LABELS}"] == GETS_PER_FILE, "an md5 mismatch was retried"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("experiment", "message"), [
    (" ", "--experiment: ' ' is blank; give the run directory a name"),
    (" lead", "--experiment: ' lead' starts or ends with whitespace, which shells and folders hide"),
    ("tab\there", "--experiment: 'tab\\there' holds control characters"),
    ("x" * 300, f"--experiment: {'x' * 20!r}... is 300 bytes long, more than a file name may be here (255); "
                "choose a shorter name"),
])
def test_bad_experiment_names_are_refused_before_any_stage(home: dict[str, str], tmp_path: Path, experiment: str,
                                                           message: str) -> None:
    done = run_flow("--experiment", experiment, env=home, cwd=tmp_path)
    assert_failed(done, 2, f"fashion.py: error: {message}", flow_runs=0)
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write: a read-only tmpfs as root (root writes anywhere else), else chmod 500."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if ROOT:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)


def test_unwritable_runs_folder_is_refused_before_any_stage(home: dict[str, str], read_only_folder: Path,
                                                           tmp_path: Path) -> None:
    reason = "is on a read-only file system" if ROOT else "is not writable by this user"
    done = run_flow("--runs-dir", str(read_only_folder), env=home, cwd=tmp_path)
    assert_failed(done, 2, f"fashion.py: error: --runs-dir {str(read_only_folder)!r} {reason}; choose another folder",
                  flow_runs=0)
    inside = read_only_folder / "runs"
    done = run_flow("--data-dir", str(inside), env=home, cwd=tmp_path)
    assert_failed(done, 2, f"fashion.py: error: --data-dir {str(inside)!r} cannot be created: "
                           f"{str(read_only_folder)!r} {reason}; choose another folder", flow_runs=0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="a small tmpfs for a full disk needs root to mount")
def test_full_disk_fails_once_and_a_rerun_resumes_exactly(home: dict[str, str], synthetic_mirror: Path,
                                                          tmp_path: Path, finished_run: tuple[Path, dict]) -> None:
    runs = tmp_path / "small-disk"
    runs.mkdir()
    # Room for the dataset's inspection and the graph, and for one training checkpoint: not two.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(runs)], check=True)
    try:
        args = [*tiny_args(), "--mirror", str(synthetic_mirror), "--runs-dir", str(runs), "--data-dir",
                str(tmp_path / "data")]
        done = run_flow(*args, env=home, cwd=tmp_path)
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"fashion.py: error: No space left on device: {runs}/fashion_mnist_experiment_1/train-")
        assert last.endswith(": free some space there and run again: the run resumes where it stopped")
        assert_failed(done, 1, last, flow_runs=1)
        assert "Retry 1/" not in done.stderr, "a full disk was retried"
        assert "less than the" in done.stderr and "this training's checkpoints need" in done.stderr  # the warning
        # Nothing half-written looks valid: no temporary files, no training manifest, no model; the
        # checkpoints that are there all load.
        run_dir = runs / "fashion_mnist_experiment_1"
        files = leftovers(run_dir)
        assert not [name for name in files if name.endswith(".tmp")], files
        assert not [name for name in files if name.endswith(("training.json", "model.pt", "model.json"))], files
        checkpoints = list(run_dir.glob("train-*/checkpoints/*.pt"))
        assert checkpoints and all(load_checkpoint(path) for path in checkpoints)

        subprocess.run(["mount", "-o", "remount,size=64m", str(runs)], check=True)  # space freed
        rerun = run_flow(*args, env=home, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "Resuming from" in rerun.stderr
        result = json.loads((run_dir / "metrics.json").read_text())
        assert same_weights(final_weights(result), final_weights(finished_run[1]))
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="a read-only training folder needs root to mount (root writes anywhere else)")
def test_sweep_reports_a_permanent_failure_in_its_line(prefect_api_url: str, synthetic_mirror: Path,
                                                       tmp_path: Path) -> None:
    configurations = [{"lr": 0.01}, {"lr": 0.05}]
    base = TINY | {"runs_dir": str(tmp_path / "runs"), "data_dir": str(tmp_path / "data"), "mirror": str(synthetic_mirror),
                   "validation_size": VALIDATION}
    failing = plan("sweep", base, configurations=configurations)[1]
    dataset = download(base["data_dir"], mirror=base["mirror"])
    blocked = training_dir(dataset, str(failing.config.run_dir), Hyperparameters.of(failing.config), failing.device)
    blocked.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(blocked)], check=True)
    try:
        status = sweep_main(["--configurations", json.dumps(configurations), "--workers", "2",
                             *[f"--{name.replace('_', '-')}={value}" for name, value in base.items()]])
    finally:
        subprocess.run(["umount", str(blocked)], check=True)
    assert status == 1
    entries = json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())["configurations"]
    assert [entry["state"] for entry in entries] == ["Completed", "Failed"]
    assert entries[1]["error"].startswith(f"train: Read-only file system: {blocked}/")
    assert entries[1]["error"].endswith(": the file system is read-only: choose a writable folder")
    [train_run] = [run for run in read_task_runs(prefect_api_url) if run["name"] == f"train {failing.name}"
                   and run["state_name"] == "Failed"]  # this sweep's, whichever tests ran before on the server
    assert train_run["run_count"] == 1, "a permanent failure was retried"


def read_task_runs(api_url: str) -> list[dict]:
    import httpx

    with httpx.Client(trust_env=False) as client:
        response = client.post(f"{api_url}/task_runs/filter", json={})
    response.raise_for_status()
    return response.json()
