"""TensorBoard served on loopback and driven in headless Chromium: the browser test's helpers, and bench/screenshots.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.helpers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium, never a downloaded one; no sandbox (it will not start as root with one, as in CI), no GPU,
# and nothing fetched from outside.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1280, "height": 960}
# The element of one chart in each dashboard; it holds the tag's name and the chart's SVG.
CARDS = {"scalars": "tf-scalar-card", "pr_curves": "tf-pr-curve-card"}
# A plotted line with at least two points: Plottable draws each as `<path class="line" d="M… L…">`.
DRAWN_LINE = 'path.line[d*="L"]'
LOSS_TAG = "training loss"
# The tabs a finished run fills. PROJECTOR joins the tab bar a moment after the first request (checked in a thread).
RUN_TABS = {"scalars", "images", "graphs", "text", "pr_curves", "hparams", "projector"}
# Loopback only: never through a proxy that the environment may name.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_json(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET `url`, or POST `body` to it as JSON, and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _opener.open(request, timeout=10) as response:
        return json.load(response)


def fetch_bytes(url: str) -> bytes:
    with _opener.open(url, timeout=10) as response:
        return response.read()


def active_tabs(url: str) -> set[str]:
    """The dashboards TensorBoard shows as tabs: those with data."""
    return {name for name, plugin in fetch_json(f"{url}/data/plugins_listing").items() if plugin["enabled"]}


def tags(url: str, plugin: str) -> dict[str, Any]:
    """Run name -> that run's tags in `plugin` ("scalars", "images", "pr_curves", "text")."""
    return fetch_json(f"{url}/data/plugin/{plugin}/tags")


@contextmanager
def tensorboard(logdir: Path, log: Path, timeout: float = 60) -> Iterator[str]:
    """TensorBoard serving `logdir` on a free loopback port, its output written to `log`.

    Yields its base URL once it lists a run; stops it and its data server on exit, also on errors.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port)]
    with open(log, "wb") as output:
        # A process group of its own: stopping it also stops the data server it starts.
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answers() -> Any:
            if process.poll() is not None:
                raise RuntimeError(f"TensorBoard exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            return fetch_json(f"{url}/data/runs")

        wait_for(answers, f"TensorBoard listing a run of {logdir} at {url}", timeout)
        yield url
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Terminate the process group led by `process`; kill it if it is still there after 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except ProcessLookupError:
        pass  # the whole group has already gone
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A page in headless Debian Chromium driven by playwright; the browser and its driver end on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def show_dashboard(page: Page, url: str, dashboard: str, tag: str, runs: str = "", timeout_ms: float = 30_000) -> None:
    """Open TensorBoard's `dashboard` tab, showing the runs that match the regex `runs` (all if empty),
    and wait until the chart of `tag` has drawn its line.

    Playwright's CSS and text selectors pierce the shadow DOM of TensorBoard's web components.
    """
    run_filter = f"&regexInput={quote(runs, safe='')}" if runs else ""  # the runs selector's filter, kept in the URL
    page.goto(f"{url}/#{dashboard}{run_filter}")
    card = page.locator(CARDS[dashboard]).filter(has=page.get_by_text(tag, exact=True)).first
    card.locator(DRAWN_LINE).first.wait_for(state="attached", timeout=timeout_ms)
    page.mouse.move(0, 0)  # no hover tooltip in the picture
    page.wait_for_load_state("networkidle", timeout=timeout_ms)
