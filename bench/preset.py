"""Choose the accurate preset on the validation split, then measure it on the test set, side by side.

    python bench/preset.py choose [--seeds 0 1 2]     # candidates on a 5000-image validation split
    python bench/preset.py measure [--seeds 0 1 2]    # the chosen preset and the previous one, on the test set

`choose` trains each candidate with `--validation-size 5000` (the test set is never looked at) and
prints its mean validation accuracy. `measure` trains the previous and the current `--preset
accurate` on all 60,000 training images, alternating seed by seed, and prints their test accuracies and
training times with the ratio. Runs go to a temporary folder; the data comes from the shared mirror.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fashion_pipeline.flows.command_line import PRESETS

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data" / "fashion-mnist"
PREVIOUS = {"optimizer": "adam", "schedule": "onecycle", "batch_size": 64, "epochs": 15, "lr": 0.003}
# SGD with weight decay, on flipped images, predicting with the test-time flip: the base of the later candidates.
FLIPPED = {"optimizer": "sgd", "schedule": "onecycle", "momentum": 0.9, "weight_decay": 5e-4, "augment": True,
           "augment_shift": 0, "test_time_flip": True}
PRESET = PRESETS["accurate"]  # FLIPPED, batch 64, lr 0.1, 15 epochs
CANDIDATES = {  # tried in this order; docs/performance.md gives their figures
    "previous": PREVIOUS,
    "augment + label smoothing": PREVIOUS | {"augment": True, "label_smoothing": 0.1},
    "18 epochs": PREVIOUS | {"epochs": 18},
    "18 epochs + label smoothing": PREVIOUS | {"epochs": 18, "label_smoothing": 0.1},
    "lr 0.006": PREVIOUS | {"lr": 0.006},
    "batch 128, lr 0.006, 20 epochs": PREVIOUS | {"batch_size": 128, "lr": 0.006, "epochs": 20},
    "batch 256, lr 0.01, 28 epochs": PREVIOUS | {"batch_size": 256, "lr": 0.01, "epochs": 28},
    "batch 32, lr 0.002, 10 epochs": PREVIOUS | {"batch_size": 32, "lr": 0.002, "epochs": 10},
    "batch 32, lr 0.002, 10 epochs + label smoothing": PREVIOUS | {"batch_size": 32, "lr": 0.002, "epochs": 10,
                                                                  "label_smoothing": 0.1},
    "lr 0.006, 18 epochs + label smoothing": PREVIOUS | {"lr": 0.006, "epochs": 18, "label_smoothing": 0.1},
    "sgd + flips, batch 64, lr 0.1, 15 epochs": FLIPPED | {"batch_size": 64, "lr": 0.1, "epochs": 15},
    "sgd + flips, batch 128, lr 0.2, 20 epochs": FLIPPED | {"batch_size": 128, "lr": 0.2, "epochs": 20},
    "sgd + flips, batch 128, lr 0.2, 16 epochs": FLIPPED | {"batch_size": 128, "lr": 0.2, "epochs": 16},
    "sgd + flips, batch 128, lr 0.2, 15 epochs": FLIPPED | {"batch_size": 128, "lr": 0.2, "epochs": 15},
    "sgd + flips, batch 256, lr 0.4, 28 epochs": FLIPPED | {"batch_size": 256, "lr": 0.4, "epochs": 28},
    # Around the preset: one change each.
    "the preset, weight decay 2e-4": PRESET | {"weight_decay": 2e-4},
    "the preset, lr 0.05": PRESET | {"lr": 0.05},
    "the preset, 18 epochs": PRESET | {"epochs": 18},
    "the preset + label smoothing 0.1": PRESET | {"label_smoothing": 0.1},
    "the preset, batch 32, lr 0.05, 12 epochs": PRESET | {"batch_size": 32, "lr": 0.05, "epochs": 12},
}


def train(settings: dict, seed: int, work: Path, validation: int) -> dict:
    """One command-line run of the flow; its metrics.json, with the training's seconds."""
    name = f"{abs(hash(json.dumps(settings, sort_keys=True)))}-{seed}-{validation}"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    done = subprocess.run([sys.executable, str(REPO / "flows" / "fashion.py"), *options, f"--seed={seed}",
                           f"--validation-size={validation}", "--experiment", name, "--runs-dir", str(work / "runs"),
                           "--data-dir", str(work / "data"), "--mirror", str(MIRROR), "--log-every", "5000",
                           "--device", "cpu"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1])
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    metrics["seconds"] = json.loads((Path(metrics["train_dir"]) / "training.json").read_text())["seconds"]
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("choose", "measure"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
                        help="choose: the candidates to train (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fashion-preset-") as folder:
        work = Path(folder)
        if args.step == "choose":
            for name in args.candidates:
                settings = CANDIDATES[name]
                runs = [train(settings, seed, work, validation=5000) for seed in args.seeds]
                accuracies = [run["validation_accuracy"] for run in runs]
                print(f"{name:28} validation accuracy {statistics.mean(accuracies):.4f} "
                      f"({', '.join(f'{a:.4f}' for a in accuracies)}), training {statistics.mean(r['seconds'] for r in runs):.1f} s",
                      flush=True)
        else:
            results: dict[str, list[dict]] = {"previous": [], "accurate": []}
            for seed in args.seeds:  # alternating, so that the machine's drifts fall on both alike
                for name, settings in (("previous", PREVIOUS), ("accurate", PRESET)):
                    results[name].append(train(settings, seed, work, validation=0))
            for name, runs in results.items():
                accuracies = [run["test_accuracy"] for run in runs]
                print(f"{name:10} test accuracy {statistics.mean(accuracies):.4f} "
                      f"({', '.join(f'{a:.4f}' for a in accuracies)}), training {statistics.mean(r['seconds'] for r in runs):.1f} s")
            ratio = (statistics.mean(r["seconds"] for r in results["accurate"])
                     / statistics.mean(r["seconds"] for r in results["previous"]))
            print(f"training time, accurate / previous: {ratio:.2f} (target <= 1.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
