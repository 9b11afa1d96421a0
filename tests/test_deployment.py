"""prefect.yaml's deployment on a real Prefect server and process worker, both started here on 127.0.0.1.

One server, work pool, deployment and worker serve the whole module; every process is stopped at the
end, also when a test fails. The worker runs in a folder outside the repository, so the deployment's
pull step must find the code by itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.sorting import TaskRunSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from fashion_pipeline.flows.deployment import DEPLOYMENT, deployment_schedule, deployment_spec
from fashion_pipeline.tasks.config import STAGES
from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.helpers import FLOW_SCRIPT, REPO, TASK_RUNS, TINY, VALIDATION, expected_loss_steps
from tests.prefect_server import PrefectServer, stop
from tests.tensorboard_reader import image_steps, load_runs, scalar_steps, training_run

FLOW_NAME = "fashion-mnist"
SWEEP_FLOW = "fashion-mnist-sweep"
SPEC = deployment_spec()
POOL = SPEC["work_pool"]["name"]
T = TypeVar("T")


# --- fast: the schedule as prefect.yaml writes it -------------------------------------------------


def test_schedule_read_from_prefect_yaml(tmp_path: Path) -> None:
    (tmp_path / "prefect.yaml").write_text(
        "deployments:\n"
        "  - name: other\n    schedules: [{cron: '0 1 * * *', timezone: UTC}]\n"
        "  - name: weekly\n    schedules: [{cron: '30 2 * * 1', timezone: Europe/Berlin}]\n"
    )
    schedule = deployment_schedule("weekly", tmp_path / "prefect.yaml")
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1", "Europe/Berlin")
    with pytest.raises(LookupError, match="'missing'"):
        deployment_schedule("missing", tmp_path / "prefect.yaml")


def test_repository_deployment_is_nightly_and_never_overlaps() -> None:
    schedule = deployment_schedule()
    assert schedule.cron == "0 3 * * *" and schedule.timezone == "UTC"
    assert SPEC["entrypoint"] == "flows/fashion.py:fashion"
    assert SPEC["concurrency_limit"] == 1


# --- real processes --------------------------------------------------------------------------------


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start a process in a session of its own, writing its output to `log`."""
    with open(log, "wb") as output:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def wait_logged(check: Callable[[], T | None], timeout: float, what: str, log: Path) -> T:
    """`wait_for`, failing the test with the end of `log` when time runs out."""
    try:
        return wait_for(check, what, timeout, interval=0.5)
    except TimeoutError as error:
        raise AssertionError(f"{error}; {log.name}:\n{tail(log)}") from None


def prefect_cli(server: PrefectServer, *args: str) -> None:
    """`prefect ARGS` in the repository, against the module's server."""
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=server.env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port, with SQLite in a Prefect home of its own."""
    server = PrefectServer(
        tmp_path_factory.mktemp("prefect-server"),
        # No runs created from the nightly schedule: one due now would fetch the real dataset.
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        # A run waiting for the deployment's one slot asks again after 1 s instead of 30 s.
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        api = get_client(sync_client=True)
    with api:
        yield api


@pytest.fixture(scope="module")
def deployment(server: PrefectServer, client: SyncPrefectClient) -> DeploymentResponse:
    """prefect.yaml deployed the way the README says: work pool, then `prefect deploy`."""
    prefect_cli(server, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(server, "--no-prompt", "deploy", "--all")
    return client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}")


@pytest.fixture(scope="module")
def worker(server: PrefectServer, deployment: DeploymentResponse, synthetic_folder: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A process worker on the pool, started in an empty folder outside the repository; yields its log."""
    elsewhere = tmp_path_factory.mktemp("worker-cwd")
    env = server.env | {"FASHION_MNIST_CHECKSUMS": str(synthetic_folder / "checksums.json")}
    log = server.root / "worker.log"
    process = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, log, cwd=elsewhere)
    try:
        yield log
    finally:
        stop(process)


@pytest.fixture(scope="module")
def tiny_parameters(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deployment-runs")
    return TINY | {"runs_dir": str(root / "runs"), "data_dir": str(root / "data"), "mirror": str(synthetic_folder)}


def wait_until_final(client: SyncPrefectClient, created: FlowRun, log: Path, timeout: float = 240) -> FlowRun:
    """The flow run, read once the worker has brought it to a final state."""

    def finished() -> FlowRun | None:
        run = client.read_flow_run(created.id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_logged(finished, timeout, f"flow run {created.name}", log)


def stage_states(client: SyncPrefectClient, flow_run: FlowRun, count: int, log: Path) -> dict[str, list[str]]:
    """Each task's run states in start order, e.g. {"train": ["Completed", "Cached"]}, once all `count` task runs
    are recorded in a final state (the server records them from events, a moment after the flow run ends)."""

    def recorded() -> dict[str, list[str]] | None:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        if len(runs) < count or not all(run.state is not None and run.state.is_final() for run in runs):
            return None
        states: dict[str, list[str]] = {}
        for task_run in runs:
            states.setdefault(task_run.name.split()[0], []).append(task_run.state.name)  # "train deployed"
        return states

    return wait_logged(recorded, 30, f"the task runs of {flow_run.name}", log)


def test_deployed_with_schedule_limit_schema_and_portable_pull_step(deployment: DeploymentResponse) -> None:
    assert deployment.work_pool_name == POOL
    assert deployment.entrypoint == "flows/fashion.py:fashion"
    assert deployment.parameters == SPEC["parameters"]
    [schedule] = deployment.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    properties = deployment.parameter_openapi_schema["properties"]
    assert properties["epochs"]["minimum"] == 1 and properties["optimizer"]["enum"] == ["sgd", "adam"]
    assert properties["epochs"]["description"] == "Passes over the training set."  # the UI's run form explains each
    # Nothing of the deploying machine's checkout is stored: the worker finds the code itself.
    assert str(REPO) not in json.dumps(deployment.pull_steps)


@pytest.mark.parametrize("invalid", [{"epochs": 0}, {"batch_size": 0}, {"optimizer": "lbfgs"}])
def test_invalid_parameters_are_rejected(client: SyncPrefectClient, deployment: DeploymentResponse,
                                         invalid: dict[str, Any]) -> None:
    with pytest.raises(PrefectHTTPStatusError) as rejected:
        client.create_flow_run_from_deployment(deployment.id, parameters=invalid)
    assert rejected.value.response.status_code == 409
    assert f"field '{next(iter(invalid))}'" in rejected.value.response.text


@pytest.fixture(scope="module")
def first_run(client: SyncPrefectClient, deployment: DeploymentResponse, worker: Path,
              tiny_parameters: dict[str, Any]) -> FlowRun:
    created = client.create_flow_run_from_deployment(deployment.id,
                                                     parameters=tiny_parameters | {"experiment": "deployed"})
    return wait_until_final(client, created, worker)


def test_worker_run_completes_with_tensorboard_output(client: SyncPrefectClient, worker: Path, first_run: FlowRun,
                                                       tiny_parameters: dict[str, Any]) -> None:
    assert first_run.state.is_completed(), f"{first_run.state}"
    assert stage_states(client, first_run, TASK_RUNS, worker)["train"] == ["Completed"]
    # Named after the experiment, tagged with the project; stages named per run.
    assert first_run.name == "deployed" and "fashion-mnist" in first_run.tags
    task_runs = {run.name: run for run in client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first_run.id])))}
    assert set(task_runs) == {"download", *(f"{stage} deployed" for stage in STAGES[1:]), "report deployed"}
    assert not {"cpu", "cuda"} & set(task_runs["train deployed"].tags)  # a device tag on accelerators only
    runs = load_runs(Path(tiny_parameters["runs_dir"]) / "deployed")
    assert image_steps(runs, ".", "four_fashion_mnist_images") == [0]
    assert scalar_steps(runs, training_run(runs), "training loss") == expected_loss_steps()


@pytest.fixture(scope="module")
def later_runs(client: SyncPrefectClient, deployment: DeploymentResponse, worker: Path, first_run: FlowRun,
               tiny_parameters: dict[str, Any]) -> dict[str, FlowRun]:
    """Two runs created at once: the first run's parameters again, and a new experiment whose evaluation fails once."""
    created = {
        "again": client.create_flow_run_from_deployment(
            deployment.id, parameters=tiny_parameters | {"experiment": "deployed"}),
        "faulty": client.create_flow_run_from_deployment(
            deployment.id, parameters=tiny_parameters | {"experiment": "faulty"},
            job_variables={"env": {"FASHION_FAULT": "evaluate"}}),
    }
    return {name: wait_until_final(client, run, worker) for name, run in created.items()}


def test_second_run_takes_training_from_cache(client: SyncPrefectClient, worker: Path,
                                              later_runs: dict[str, FlowRun]) -> None:
    again = later_runs["again"]
    assert again.state.is_completed(), f"{again.state}"
    states = stage_states(client, again, TASK_RUNS, worker)
    assert states.pop("report") == ["Completed"]  # the report is always written afresh
    assert states == {stage: ["Cached"] for stage in STAGES}


def test_failed_stage_is_retried_from_cache(client: SyncPrefectClient, worker: Path,
                                            later_runs: dict[str, FlowRun]) -> None:
    faulty = later_runs["faulty"]
    assert faulty.state.is_completed(), f"{faulty.state}"
    assert faulty.run_count == 2  # the flow's own retry, in the same flow run
    assert "AwaitingRetry" in [state.name for state in client.read_flow_run_states(faulty.id)]
    states = stage_states(client, faulty, 2 * TASK_RUNS - 1, worker)
    assert states["evaluate"] == ["Failed", "Completed"]
    # Trained once; the retry took every finished stage from cache.
    assert states["train"] == states["inspect"] == states["graph"] == states["checkpoint"] == ["Completed", "Cached"]


@pytest.fixture(scope="module")
def notices(server: PrefectServer) -> Iterator[list[dict]]:
    """flows/notices.py's automation, pointed at a webhook on loopback; yields the notices it receives."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/notice"
        done = subprocess.run([sys.executable, str(REPO / "flows" / "notices.py"), "--webhook", url], env=server.env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        yield received
    finally:
        receiver.shutdown()


def test_permanent_failure_fails_at_once_with_its_line_and_a_notice(
    client: SyncPrefectClient, deployment: DeploymentResponse, worker: Path, later_runs: dict[str, FlowRun],
    tiny_parameters: dict[str, Any], notices: list[dict],
) -> None:
    created = client.create_flow_run_from_deployment(deployment.id, parameters=tiny_parameters | {"experiment": " "})
    refused = wait_until_final(client, created, worker)
    line = "--experiment: ' ' is blank; give the run directory a name"
    assert refused.state.is_failed()
    assert line in refused.state.message
    assert refused.run_count == 1  # not retried: a retry cannot mend it
    assert "AwaitingRetry" not in [state.name for state in client.read_flow_run_states(refused.id)]
    # The failure notice: only this run failed, so it is the one notice.
    [notice] = wait_for(lambda: list(notices), "the failure notice", 60)
    assert notice["subject"] == f"Fashion-MNIST: flow run {refused.name} Failed"
    assert line in notice["body"] and str(refused.id) in notice["body"]


def test_runs_never_overlap(client: SyncPrefectClient, later_runs: dict[str, FlowRun]) -> None:
    first, second = sorted(later_runs.values(), key=lambda run: run.start_time)
    assert first.end_time <= second.start_time
    assert "AwaitingConcurrencySlot" in [state.name for state in client.read_flow_run_states(second.id)]


def test_serve_uses_the_schedule_of_prefect_yaml(server: PrefectServer, client: SyncPrefectClient) -> None:
    log = server.root / "serve.log"
    process = start([sys.executable, str(FLOW_SCRIPT), "--serve", "--experiment", "served", "--epochs", "3"],
                    server.env, log)
    try:
        def served() -> DeploymentResponse | None:
            assert process.poll() is None, f"fashion.py --serve exited:\n{tail(log)}"
            try:
                return client.read_deployment_by_name(f"{FLOW_NAME}/{DEPLOYMENT}-serve")
            except ObjectNotFound:
                return None

        deployment = wait_logged(served, 120, "the served deployment", log)
    finally:
        stop(process)
    [schedule] = deployment.schedules
    expected = deployment_schedule()
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (expected.cron, expected.timezone)
    assert deployment.parameters["experiment"] == "served" and deployment.parameters["epochs"] == 3
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1


def test_pull_step_refuses_a_copy_without_prefect_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fashion_pipeline.flows import deployment as schedule

    monkeypatch.setattr(schedule, "PREFECT_FILE", tmp_path / "site-packages" / "prefect.yaml")  # an installed copy
    with pytest.raises(FileNotFoundError, match="holds no prefect.yaml: the worker imports an installed copy"):
        schedule.enter_repository()


# --- the sweep deployment --------------------------------------------------------------------------


def test_the_sweep_deployment_takes_plain_json_and_a_paused_weekly_schedule(client: SyncPrefectClient,
                                                                            deployment: DeploymentResponse) -> None:
    spec = deployment_spec("sweep")
    sweep = client.read_deployment_by_name(f"{SWEEP_FLOW}/sweep")
    assert sweep.entrypoint == spec["entrypoint"] == "flows/sweep.py:sweep" and sweep.work_pool_name == POOL
    assert sweep.parameters == spec["parameters"] and json.loads(json.dumps(sweep.parameters)) == sweep.parameters
    [schedule] = sweep.schedules
    assert not schedule.active and schedule.schedule.cron == "0 4 * * 6"
    properties = sweep.parameter_openapi_schema["properties"]
    assert {"grid", "configurations", "base", "halving", "dask_address", "dask_cluster", "adapt"} <= set(properties)


def run_sweep_deployment(server: PrefectServer, client: SyncPrefectClient, name: str, **parameters: Any) -> FlowRun:
    """`prefect deployment run 'fashion-mnist-sweep/sweep' -p KEY=JSON ... --watch`, as the README says; the flow run."""
    options = [f"{key}={json.dumps(value)}" for key, value in parameters.items()]
    subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", f"{SWEEP_FLOW}/sweep", "-p", f"name={name}",
                    *(part for option in options for part in ("-p", option)), "--watch", "--watch-timeout", "400"],
                   cwd=REPO, env=server.env, capture_output=True, text=True, timeout=450)
    [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"sweep {name}"])))
    return run


def test_the_sweep_deployment_runs_on_the_worker(server: PrefectServer, client: SyncPrefectClient, worker: Path,
                                                 tiny_parameters: dict[str, Any]) -> None:
    base = tiny_parameters | {"validation_size": VALIDATION}
    run = run_sweep_deployment(server, client, "deployed", grid={"lr": [0.01, 0.02]}, base=base, halving=None)
    assert run.state.is_completed(), f"{run.state}\n{tail(worker)}"
    summary = json.loads((Path(base["runs_dir"]) / "deployed" / "sweep.json").read_text())
    assert [entry["state"] for entry in summary["configurations"]] == ["Completed", "Completed"]
    assert summary["best"]["name"] in ("lr=0.01", "lr=0.02")


def test_a_bad_sweep_plan_fails_the_deployed_run_in_one_line(server: PrefectServer, client: SyncPrefectClient,
                                                              worker: Path, tiny_parameters: dict[str, Any]) -> None:
    run = run_sweep_deployment(server, client, "bad-plan", grid={"lr": []}, base=tiny_parameters)
    assert run.state.is_failed() and run.run_count == 1
    assert run.state.message.endswith("grid lr: give a non-empty list of values (got [])"), run.state.message
    assert not (Path(tiny_parameters["runs_dir"]) / "bad-plan").exists()
