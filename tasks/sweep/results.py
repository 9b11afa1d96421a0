"""A sweep's results: which configurations a rung promotes, sweep.json's summary and the table artifact."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_table_artifact

from fashion_pipeline.tasks.report import artifact_key
from fashion_pipeline.tasks.sweep.plan import Trial

# The best configuration is picked on held-out training images, never on the test set, whose accuracy
# (reported beside it) would otherwise be biased upward by the choice.
METRIC, REPORTED = "validation_accuracy", "test_accuracy"


def promote(entries: list[dict[str, Any]], eta: int) -> list[str]:
    """The names of the rung's best completed configurations by validation accuracy: 1/`eta` of all it
    trained (at least one), so that a failed configuration takes no other one's place."""
    completed = [entry for entry in entries if entry["state"] == "Completed"]
    ranked = sorted(completed, key=lambda entry: -entry[METRIC])  # stable: the first of equals first
    return [entry["name"] for entry in ranked[: max(1, len(entries) // eta)]]


def describe(entry: dict[str, Any]) -> str:
    """A configuration's outcome as one log line."""
    if entry["state"] == "Completed":
        return (f"{entry['name']}: validation accuracy {entry[METRIC]:.4f}, test accuracy {entry[REPORTED]:.4f}, "
                f"mean AP {entry['mean_ap']:.4f}")
    return f"{entry['name']}: {entry['state']}, {entry['error']}"


def summarise(name: str, trials: list[Trial], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """sweep.json: every configuration with its result or failure, and the best by validation accuracy."""
    completed = [entry for entry in entries if entry["state"] == "Completed"]
    full = max((entry.get("epochs", 0) for entry in completed), default=0)  # with halving: the last rung's
    best = max((entry for entry in completed if entry.get("epochs", 0) == full), key=lambda entry: entry[METRIC],
               default=None)  # the first of equals
    return {
        "name": name, "runs_dir": trials[0].config.runs_dir, "varied": list(trials[0].values), "metric": METRIC,
        "best": best, "completed": len(completed), "failed": len(entries) - len(completed), "configurations": entries,
    }


def publish_table(name: str, entries: list[dict[str, Any]]) -> None:
    """The comparison as a Prefect table artifact: one row per configuration."""
    rows = [entry["values"] | {"epochs": entry.get("epochs"), METRIC: entry.get(METRIC), REPORTED: entry.get(REPORTED),
                               "mean_ap": entry.get("mean_ap"), "state": entry["state"], "error": entry.get("error", "")}
            for entry in entries]
    create_table_artifact(rows, key=f"{artifact_key(name)}-sweep", description=f"Sweep {name}: one row per configuration")
