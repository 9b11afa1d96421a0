"""Time the flow against the tutorial script and the bare training loop, on the real data, one after another.

    python bench/bench.py [--device cuda] [--keep] [--skip-tutorial]

Runs (a) the flow with the tutorial's settings, from a fresh Prefect home and data folder (its
local Prefect server started on the way, as a user's first run does), (a') the same in new runs and
data folders, the server now running, (b) bench/tutorial.py, (c) bench/bare_loop.py, and (d) the flow
again with (a)'s arguments (all stages cached) alternating with `python -c "import prefect"`, four
times each, side by side. Reads only the local mirror folder; downloads nothing. Prints a table and the issue's ratios with their targets;
exits 0 when all targets pass, 1 when one fails, 2 when a run fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil  # and no torch: a child's ru_maxrss starts at this process' RSS when forked, so this one stays small

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = REPO.parent / "shared" / "data" / "fashion-mnist"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SAMPLE_SECONDS = 0.05
REPEATS = 4  # cached reruns and `import prefect` runs, alternating: their medians are compared
MIB = 1 << 20
LEGEND = f"""\
wall: the whole command, start to exit. train: the training loop's own clock (flow: training.json 'seconds').
tree peak RSS: the most the process and all its descendants held at once, RSS summed over the tree and sampled
  every {SAMPLE_SECONDS * 1000:.0f} ms, and never less than the main process peak (samples can miss a short peak).
  The first flow run's tree includes the local Prefect server it starts; a page shared by processes counts in each.
flow, cached and import prefect: medians of {REPEATS} runs, alternating.
main process peak RSS: ru_maxrss from os.wait4, kept by the kernel: the main process' own peak, or that of a
  descendant it reaped if larger (a maximum, never a sum)."""
# Variables that would point the runs elsewhere than a fresh user's first run: another Prefect server
# or profile, another mirror or checksum list, an injected fault.
FOREIGN_ENV = ("PREFECT_", "FASHION_MNIST_", "FASHION_FAULT")


class BenchError(RuntimeError):
    """A run that failed, or a mirror that is incomplete: no figures to compare."""


@dataclass(frozen=True)
class Measurement:
    """One run's figures; None where a run has no such figure."""

    name: str
    wall_seconds: float
    train_seconds: float | None
    test_accuracy: float | None
    tree_peak_rss: int  # bytes: the most the process and all its descendants held together (sampled; >= the next)
    process_peak_rss: int  # bytes: ru_maxrss from wait4, the main process' peak (or a reaped descendant's, if larger)
    note: str = ""


class TreeRssSampler:
    """Sums the RSS of a process and all its descendants every SAMPLE_SECONDS in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(SAMPLE_SECONDS)

    def _tree_rss(self) -> int:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has exited
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        return total


def run_measured(name: str, command: Sequence[str], env: dict[str, str], logs: Path) -> tuple[float, int, int, Path]:
    """Run `command` in the repository root; its wall time, tree peak RSS, main process peak RSS and stdout file.

    stdout and stderr go to `<logs>/<name>.out` and `.err`. The child is reaped with os.wait4 for its rusage.
    """
    stem = re.sub(r"\W+", "_", name)  # "flow, cached" -> flow_cached
    stdout_path, stderr_path = logs / f"{stem}.out", logs / f"{stem}.err"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        with TreeRssSampler(process.pid) as sampler:
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if process.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{name} exited with {process.returncode}; {stderr_path} ends:\n" + "\n".join(tail))
    process_peak = usage.ru_maxrss * 1024  # KiB on Linux
    # Samples can miss a short peak; the tree held at least what its largest process held at its peak.
    return wall, max(sampler.peak, process_peak), process_peak, stdout_path


def prepare_raw(mirror: Path, data_dir: Path, extract: bool) -> Path:
    """Copy the .gz files into `<data_dir>/FashionMNIST/raw`, and decompress them there if `extract`.

    The flow, run first, has checked their md5 against torchvision's list, so torchvision's
    `download=True` in the tutorial finds them valid and never goes to the network.
    """
    raw = data_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(mirror / name, raw / name)
        if extract:
            with gzip.open(raw / name) as packed, open(raw / name.removesuffix(".gz"), "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked)
    return data_dir


def run_env(prefect_home: Path) -> dict[str, str]:
    """This environment minus foreign settings, plus a private Prefect home and no telemetry.

    No PREFECT_API_URL: the first flow run starts the home's local Prefect server, as on a user's first run.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith(FOREIGN_ENV)}
    return env | {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def measure_flow(name: str, args: list[str], env: dict[str, str], runs_dir: Path, logs: Path) -> Measurement:
    """Run the flow script; training time from its training manifest, accuracy from `<run>/metrics.json`."""
    wall, tree, process_peak, _ = run_measured(name, [sys.executable, "flows/fashion.py", *args], env, logs)
    found = list(runs_dir.glob("*/metrics.json"))
    if len(found) != 1:
        raise BenchError(f"{name}: expected one <run>/metrics.json under {runs_dir}, found {len(found)}")
    metrics = json.loads(found[0].read_text())
    stages = metrics["stages"]
    cached = sum(state == "Cached" for state in stages.values())
    # A cached training did not train in this run: its manifest still holds the first run's time.
    trained = stages["train"] != "Cached"
    seconds = json.loads((Path(metrics["train_dir"]) / "training.json").read_text())["seconds"] if trained else None
    note = f"{cached}/{len(stages)} stages cached"
    return Measurement(name, wall, seconds, metrics["test_accuracy"], tree, process_peak, note)


def measure_script(name: str, script: str, args: list[str], env: dict[str, str], logs: Path) -> Measurement:
    """Run a bench script; training time and accuracy from the JSON line it prints last."""
    wall, tree, process_peak, stdout = run_measured(name, [sys.executable, script, *args], env, logs)
    result = json.loads(stdout.read_text().strip().splitlines()[-1])
    return Measurement(name, wall, result["train_seconds"], result["test_accuracy"], tree, process_peak)


def run_all(args: argparse.Namespace, work: Path) -> dict[str, Measurement]:
    """The five runs, one after another, each announced as it ends."""
    logs, runs = work / "logs", work / "runs"
    logs.mkdir()
    env = run_env(work / "prefect-home")

    def flow_args(runs_dir: Path, data_dir: Path) -> list[str]:
        return ["--mirror", str(args.mirror), "--runs-dir", str(runs_dir), "--data-dir", str(data_dir),
                "--device", args.device]

    first_args = flow_args(runs, work / "flow-data")
    # The same job in new folders, with Prefect's database already created by the first run: what every
    # later first run of an experiment costs (the very first Prefect run also creates the database).
    again_runs = work / "runs-again"
    again_args = flow_args(again_runs, work / "flow-data-again")
    steps: list[tuple[str, Callable[[str], Measurement]]] = [
        ("flow", lambda name: measure_flow(name, first_args, env, runs, logs)),
        ("flow, Prefect db exists", lambda name: measure_flow(name, again_args, env, again_runs, logs)),
        ("tutorial", lambda name: measure_script(name, "bench/tutorial.py", [
            "--data-dir", str(prepare_raw(args.mirror, work / "tutorial-data", extract=False)),
            "--log-dir", str(work / "tutorial-runs"), "--seed", "0"], env, logs)),
        ("bare loop", lambda name: measure_script(name, "bench/bare_loop.py", [
            "--data-dir", str(prepare_raw(args.mirror, work / "bare-data", extract=True)),
            "--seed", "0", "--device", args.device], env, logs)),
    ]
    results = {}
    for name, measure in steps:
        if name == "tutorial" and args.skip_tutorial:
            continue
        results[name] = measure(name)
        print(f"{name}: {results[name].wall_seconds:.1f} s", flush=True)
    results |= cached_versus_import(first_args, env, runs, logs)
    return results


def cached_versus_import(args: list[str], env: dict[str, str], runs_dir: Path, logs: Path) -> dict[str, Measurement]:
    """The cached rerun and `python -c "import prefect"`, alternating REPEATS times: each one's median run."""
    cached, imported = [], []
    for repeat in range(1, REPEATS + 1):
        cached.append(measure_flow(f"flow, cached {repeat}", args, env, runs_dir, logs))
        wall, tree, process_peak, _ = run_measured(f"import prefect {repeat}", [sys.executable, "-c", "import prefect"],
                                                   env, logs)
        imported.append(Measurement("import prefect", wall, None, None, tree, process_peak))
    medians = {"flow, cached": median(cached), "import prefect": median(imported)}
    for name, measurement in medians.items():
        print(f"{name}: {measurement.wall_seconds:.2f} s (median of {REPEATS})", flush=True)
    return {name: replace(measurement, name=name) for name, measurement in medians.items()}


def median(measurements: list[Measurement]) -> Measurement:
    """The run of median wall time (the upper one of an even count)."""
    return sorted(measurements, key=lambda measurement: measurement.wall_seconds)[len(measurements) // 2]


def print_table(results: dict[str, Measurement]) -> None:
    rows = [("run", "wall s", "train s", "tree peak RSS MiB", "main process peak RSS MiB", "test accuracy", "")]
    for m in results.values():
        train = f"{m.train_seconds:.1f}" if m.train_seconds is not None else "-"
        rows.append((m.name, f"{m.wall_seconds:.1f}", train, f"{m.tree_peak_rss / MIB:.0f}",
                     f"{m.process_peak_rss / MIB:.0f}", "-" if m.test_accuracy is None else f"{m.test_accuracy:.4f}",
                     m.note))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(LEGEND)


def ratios(results: dict[str, Measurement]) -> list[tuple[str, float | None, str, Callable[[float], bool]]]:
    """The issue's targets: (label, value, target text, test); the value is None when the tutorial was skipped."""
    flow, bare, cached = results["flow"], results["bare loop"], results["flow, cached"]
    again = results["flow, Prefect db exists"]
    tutorial = results.get("tutorial")

    def versus_tutorial(value: Callable[[Measurement], float]) -> float | None:
        return None if tutorial is None else value(tutorial)

    return [
        ("flow wall / tutorial wall", versus_tutorial(lambda t: flow.wall_seconds / t.wall_seconds),
         "<= 0.75", lambda v: v <= 0.75),
        ("  the same, Prefect db exists", versus_tutorial(lambda t: again.wall_seconds / t.wall_seconds),
         "<= 0.75", lambda v: v <= 0.75),
        ("flow training / bare-loop training", flow.train_seconds / bare.train_seconds, "<= 1.10", lambda v: v <= 1.10),
        ("flow tree peak RSS / tutorial tree peak RSS", versus_tutorial(lambda t: flow.tree_peak_rss / t.tree_peak_rss),
         "<= 1.00", lambda v: v <= 1.0),
        ("cached rerun wall / first flow wall", cached.wall_seconds / flow.wall_seconds,
         "<= 0.25", lambda v: v <= 0.25),
        ("cached rerun wall / `import prefect` wall", cached.wall_seconds / results["import prefect"].wall_seconds,
         "<= 1.50", lambda v: v <= 1.5),
        ("test accuracy, flow - tutorial", versus_tutorial(lambda t: flow.test_accuracy - t.test_accuracy),
         "within +-0.01", lambda v: abs(v) <= 0.01),
    ]


def print_ratios(results: dict[str, Measurement]) -> bool:
    """Print each ratio with PASS or FAIL; True when none fails (skipped ones do not fail)."""
    passed = True
    for label, value, target, test in ratios(results):
        if value is None:
            print(f"{label:45} {'-':>8}  {target:14} skipped")
            continue
        ok = test(value)
        passed &= ok
        print(f"{label:45} {value:8.3f}  {target:14} {'PASS' if ok else 'FAIL'}")
    return passed


def stop_local_server(home: Path) -> None:
    """Stop the local Prefect server the runs started in `home`, instead of leaving it to stop when idle."""
    subprocess.run([sys.executable, "-m", "fashion_pipeline.tasks.plumbing.local_server", "stop"], cwd=REPO, env=run_env(home),
                   capture_output=True, timeout=60)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="Device for the flow and the bare loop (cpu, cuda); "
                                                        "the tutorial always trains on the CPU.")
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="Folder with the four official .gz files.")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the temporary folders (runs, data, logs) and say where.")
    parser.add_argument("--skip-tutorial", action="store_true", help="Leave out the tutorial run (quick runs).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.mirror = args.mirror.resolve()
    work = Path(tempfile.mkdtemp(prefix="fashion-bench-"))
    try:
        results = run_all(args, work)
    except BenchError as error:
        print(f"bench.py: {error}", file=sys.stderr)
        return 2
    finally:
        stop_local_server(work / "prefect-home")
        if args.keep:
            print(f"Kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(results)
    print()
    return 0 if print_ratios(results) else 1


if __name__ == "__main__":
    sys.exit(main())
