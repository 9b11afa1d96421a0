"""What a person sees: TensorBoard serving a finished run, through its HTTP API and as Chromium renders it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest

from fashion_pipeline.tasks.ml.dataset import CLASSES
from fashion_pipeline.tasks.plumbing.polling import wait_for
from fashion_pipeline.tasks.report import HPARAM_FIELDS
from tests.helpers import TINY, expected_loss_steps
from tests.tensorboard_browser import (
    CHROMIUM, DRAWN_LINE, LOSS_TAG, RUN_TABS, active_tabs, chromium_page, fetch_bytes, fetch_json, show_dashboard, tags,
    tensorboard,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"
TRAINING_IMAGES = {"predictions vs. actuals", "confusion matrix", "per-class accuracy"}


@dataclass(frozen=True)
class Served:
    url: str
    run: str  # the experiment's TensorBoard run: images, graph, projector
    train: str  # the training's run: loss, figures, PR curves, hparams, text
    result: dict


def query(url: str, route: str, **params: str) -> str:
    """The URL of a plugin's `route` with the query parameters, escaped (tags have spaces, runs slashes)."""
    return f"{url}/data/plugin/{route}?" + "&".join(f"{name}={quote(value, safe='')}" for name, value in params.items())


@pytest.fixture(scope="module")
def served(finished_run: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """TensorBoard on the runs folder, once every tab has the run's data; stopped afterwards, also on failure."""
    run_dir, result = finished_run
    log = tmp_path_factory.mktemp("tensorboard") / "tensorboard.log"
    with tensorboard(run_dir.parent, log) as url:
        train = f"{run_dir.name}/{Path(result['train_dir']).name}"

        def loaded() -> bool:
            return (RUN_TABS <= active_tabs(url) and LOSS_TAG in tags(url, "scalars").get(train, {})
                    and len(tags(url, "pr_curves").get(train, {})) == len(CLASSES))

        wait_for(loaded, f"every tab of {run_dir} in TensorBoard (log: {log})", 60)
        yield Served(url, run_dir.name, train, result)


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (CI installs Debian's chromium package)")
    with chromium_page() as opened:
        yield opened


def test_runs_and_tabs(served: Served) -> None:
    assert sorted(fetch_json(f"{served.url}/data/runs")) == [served.run, served.train]
    assert RUN_TABS <= active_tabs(served.url)


def test_scalars_serve_the_training_loss(served: Served) -> None:
    points = fetch_json(query(served.url, "scalars/scalars", run=served.train, tag=LOSS_TAG))  # [[wall, step, value]]
    assert [step for _, step, _ in points] == expected_loss_steps()
    assert all(value > 0 for _, _, value in points)


def test_images_serve_pngs(served: Served) -> None:
    images = tags(served.url, "images")
    assert set(images[served.run]) == {"four_fashion_mnist_images"}
    assert set(images[served.train]) == TRAINING_IMAGES
    for run, tag in ((served.run, "four_fashion_mnist_images"), (served.train, "confusion matrix")):
        image = fetch_json(query(served.url, "images/images", run=run, tag=tag))[-1]
        assert fetch_bytes(f"{served.url}/data/plugin/images/individualImage?{image['query']}")[:8] == PNG


def test_graph_shows_the_net(served: Served) -> None:
    assert fetch_json(f"{served.url}/data/plugin/graphs/info")[served.run]["run_graph"] is True
    graph = fetch_bytes(query(served.url, "graphs/graph", run=served.run, conceptual="false")).decode()
    assert all(f"Net/{layer}" in graph for layer in ("Conv2d[conv1]", "Conv2d[conv2]", "Linear[fc3]"))


def test_projector_shows_100_labelled_images(served: Served) -> None:
    assert fetch_json(f"{served.url}/data/plugin/projector/runs") == [served.run]
    [embedding] = fetch_json(query(served.url, "projector/info", run=served.run))["embeddings"]
    assert embedding["tensorShape"] == [100, 28 * 28]
    name = embedding["tensorName"]
    labels = fetch_bytes(query(served.url, "projector/metadata", run=served.run, name=name)).decode().splitlines()
    assert len(labels) == 100 and set(labels) <= set(CLASSES)
    assert fetch_bytes(query(served.url, "projector/sprite_image", run=served.run, name=name))[:8] == PNG


def test_pr_curves_one_per_class(served: Served) -> None:
    assert sorted(tags(served.url, "pr_curves")[served.train]) == sorted(CLASSES)
    [curve] = fetch_json(query(served.url, "pr_curves/pr_curves", run=served.train, tag=CLASSES[0]))[served.train]
    assert curve["step"] == served.result["global_step"]
    assert len(curve["precision"]) == len(curve["recall"]) > 1


def test_hparams_table_holds_the_run(served: Served) -> None:
    experiment = fetch_json(f"{served.url}/data/plugin/hparams/experiment", {"experimentName": ""})
    assert {info["name"] for info in experiment["hparamInfos"]} == set(HPARAM_FIELDS) | {"device"}
    request = {"experimentName": "", "startIndex": 0, "sliceSize": 10,
               "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
    [group] = fetch_json(f"{served.url}/data/plugin/hparams/session_groups", request)["sessionGroups"]
    assert group["name"] == served.train
    assert group["hparams"]["batch_size"] == TINY["batch_size"] and group["hparams"]["device"] == "cpu"
    metrics = {metric["name"]["tag"]: metric["value"] for metric in group["metricValues"]}
    assert metrics["hparam/test_accuracy"] == pytest.approx(served.result["test_accuracy"])


@pytest.mark.parametrize(("dashboard", "tag"), [("scalars", LOSS_TAG), ("pr_curves", sorted(CLASSES)[0])])
def test_dashboard_renders_the_run(page: Page, served: Served, tmp_path: Path, dashboard: str, tag: str) -> None:
    show_dashboard(page, served.url, dashboard, tag)
    page.screenshot(path=str(tmp_path / f"{dashboard}.png"))
    assert page.get_by_text("No dashboards are active").count() == 0
    assert page.get_by_text(served.train, exact=True).count() >= 1  # in the runs selector
    assert page.get_by_text(tag, exact=True).count() >= 1
    assert page.locator(DRAWN_LINE).count() >= 1
    assert (tmp_path / f"{dashboard}.png").read_bytes()[:8] == PNG
