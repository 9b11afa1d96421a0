"""README pictures from a finished run: TensorBoard's SCALARS dashboard as Chromium renders it, and the run's summary.

    python bench/screenshots.py [RUN_DIR] [--docs DOCS]

TensorBoard serves RUN_DIR's parent (the runs folder, as in `tensorboard --logdir runs`), so the runs keep their names;
the picture shows RUN_DIR's runs only.
The helpers that start TensorBoard and Chromium are the browser test's (tests/tensorboard_browser.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from fashion_pipeline.tasks.plumbing.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the browser helpers are the tests' own, and tests/ is not installed
from tests.tensorboard_browser import (  # noqa: E402
    CHROMIUM,
    LOSS_TAG,
    RUN_TABS,
    active_tabs,
    chromium_page,
    show_dashboard,
    tags,
    tensorboard,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=REPO / "runs" / "fashion_mnist_experiment_1",
                        help="a finished run (default: %(default)s)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args(argv)
    summary = args.run_dir / "summary.png"
    if not summary.is_file():
        print(f"screenshots.py: error: {args.run_dir} is not a finished run (no summary.png)", file=sys.stderr)
        return 2
    if not CHROMIUM.is_file():
        print(f"screenshots.py: error: no Chromium at {CHROMIUM}", file=sys.stderr)
        return 2
    args.docs.mkdir(parents=True, exist_ok=True)
    picture = args.docs / "tensorboard.png"
    run = args.run_dir.resolve()
    trainings = [f"{run.name}/{folder.name}" for folder in run.glob("train-*")]  # their TensorBoard run names
    with tempfile.TemporaryDirectory() as scratch, tensorboard(run.parent, Path(scratch) / "tensorboard.log") as url:
        training = lambda: any(LOSS_TAG in tags(url, "scalars").get(name, {}) for name in trainings)  # noqa: E731
        wait_for(lambda: RUN_TABS <= active_tabs(url) and training(), f"every tab of {run} in TensorBoard", 60)
        with chromium_page() as page:
            show_dashboard(page, url, "scalars", LOSS_TAG, runs=f"^{re.escape(run.name)}(/|$)")
            page.screenshot(path=str(picture))
    shutil.copyfile(summary, args.docs / "summary.png")
    print(f"Wrote {picture} and {args.docs / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
