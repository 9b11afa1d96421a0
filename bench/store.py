"""Time a run and its cached rerun with runs and data on an S3 store against the same on local disk, side by side.

    python bench/store.py [--repeats 2] [--mirror DIR] [-- FLOW OPTIONS]

Serves a temporary folder as S3 on loopback (`rclone serve s3`, from the test extras), then, for each
repeat, alternates: a first run on local disk (new runs and data folders), a first run on the store
(a new bucket, a new mirror cache), the cached rerun of each, and the store's cached rerun from a new
mirror cache (another machine: it fetches what it reads). All runs share one Prefect home whose local
server a warm-up run starts first. Prints each run's median wall time and the ratios with their
targets; exits 0 when both targets pass, 1 when one fails, 2 when a run fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.object_store: the same S3 server the tests start

from tests.object_store import s3_server  # noqa: E402

DEFAULT_MIRROR = REPO.parent / "shared" / "data" / "fashion-mnist"
TARGETS = {"first run": 1.15, "cached rerun": 1.5}  # store wall / local wall, at most


def timed(arguments: list[str], environment: dict[str, str]) -> float:
    """The wall time of one flow run; exits 2 with its stderr's tail when it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "flows" / "fashion.py"), *arguments], env=environment,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        print(f"a run failed ({' '.join(arguments)}):\n{done.stderr[-2000:]}", file=sys.stderr)
        raise SystemExit(2)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    parser.add_argument("flow_options", nargs="*",
                        help="options for flows/fashion.py (default: the tutorial's settings)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-store-"))
    (scratch / "s3").mkdir()
    base = {name: value for name, value in os.environ.items() if not name.startswith(("PREFECT_", "FASHION_"))}
    base |= {"PREFECT_HOME": str(scratch / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    options = ["--mirror", str(args.mirror), "--device", "cpu", *args.flow_options]
    walls: dict[str, list[float]] = {}
    with s3_server(scratch / "s3") as variables:
        environment = base | variables
        import fsspec

        timed(["--runs-dir", str(scratch / "warm-up"), "--data-dir", str(scratch / "warm-up"), *options], environment)
        for repeat in range(args.repeats):
            folder, bucket = scratch / f"local-{repeat}", f"bench-{uuid.uuid4().hex[:8]}"
            fsspec.filesystem("s3", skip_instance_cache=True, **_client(variables)).mkdir(bucket)
            local = ["--runs-dir", str(folder / "runs"), "--data-dir", str(folder / "data"), *options]
            store = ["--runs-dir", f"s3://{bucket}/runs", "--data-dir", f"s3://{bucket}/data", *options]
            here = environment | {"FASHION_STORE_CACHE": str(scratch / f"cache-{repeat}")}
            elsewhere = environment | {"FASHION_STORE_CACHE": str(scratch / f"other-cache-{repeat}")}
            for name, arguments, env in (("local, first run", local, environment), ("store, first run", store, here),
                                         ("local, cached rerun", local, environment),
                                         ("store, cached rerun", store, here),
                                         ("store, cached rerun on another machine", store, elsewhere)):
                walls.setdefault(name, []).append(timed(arguments, env))
    medians = {name: statistics.median(values) for name, values in walls.items()}
    print(f"{'run':<42}{'median wall s':>14}   all")
    for name, values in walls.items():
        print(f"{name:<42}{medians[name]:>14.2f}   {', '.join(f'{value:.2f}' for value in values)}")
    failed = False
    for kind, target in TARGETS.items():
        ratio = medians[f"store, {kind}"] / medians[f"local, {kind}"]
        failed |= ratio > target
        print(f"{kind}: store / local = {ratio:.2f} (target <= {target}) {'PASS' if ratio <= target else 'FAIL'}")
    print(f"cached rerun on another machine / local cached rerun = "
          f"{medians['store, cached rerun on another machine'] / medians['local, cached rerun']:.2f}")
    return 1 if failed else 0


def _client(variables: dict[str, str]) -> dict[str, object]:
    return {"key": variables["AWS_ACCESS_KEY_ID"], "secret": variables["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": variables["AWS_ENDPOINT_URL"]}


if __name__ == "__main__":
    sys.exit(main())
