"""The stage mechanism, written once: a stage's manifest protocol, its code digest, its Prefect cache
policy and refresh.

A stage module holds its work and nothing else:

    @stage("graph", output=graph_output, code=("ml.model",))
    def graph(run_dir: str) -> Written:
        ...                                  # the work: write the files
        return Written(files)                # the files its manifest vouches for

`graph(run_dir)` is then the plain function, runnable without Prefect: it returns the manifest's path
at once when the manifest already vouches for this output, and otherwise does the work and writes
the manifest (last, atomically). `graph.task` is the Prefect task around it.

Runs and data may live in a store (tasks/plumbing/storage.py): a stage's inputs and outputs are then
URLs, the work runs on their local mirror, the inputs' manifests are fetched before it and its output
is published after it. The work itself only ever sees local paths.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import task_run

from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.cache_locks import FlockLockManager
from fashion_pipeline.tasks.plumbing.failures import retry_transient
from fashion_pipeline.tasks.plumbing.files import Written, digest_json, sha256_file, write_manifest
from fashion_pipeline.tasks.plumbing.server_watch import await_server

PACKAGE = __name__.rpartition(".")[0]  # the stages' package: `code` names modules relative to it
# A stage's manifest path and the facts it must record for given inputs: what tells a finished,
# current output from a missing, altered or stale one.
StageOutput = tuple[Path, dict[str, Any]]
FOLDERS = frozenset({"run_dir", "data_dir"})  # the stages' inputs that name a folder: a path or a store URL
__all__ = ["Stage", "StageOutput", "Written", "source_digest", "stage"]


def source_digest(*modules: str) -> str:
    """Digest of the named modules' code, blind to comments, docstrings and formatting.

    Editing a comment or a docstring leaves it unchanged, so such edits do not invalidate the cache.
    The modules are read, not imported: a cached rerun never imports torch.
    """
    return digest_json([_code_digest(Path(importlib.util.find_spec(module).origin).read_text()) for module in modules])


@functools.cache
def _code_digest(source: str) -> str:
    """The digest of one module's code; each source is parsed once per process, however many stages name it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def input_digest(inputs: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Digest of a stage's inputs: files by their content (upstream manifests), everything else by value."""
    canonical = {
        name: sha256_file(value) if isinstance(value, Path) and value.is_file() else value
        for name, value in sorted(inputs.items())
        if name not in ignore and name != "refresh"
    }
    return digest_json(canonical)


class Stage:
    """One stage of the pipeline: its work behind its manifest, callable as a plain function; `.task` runs it in Prefect.

    The manifest records, besides the work's own facts, those of `output` for the inputs and the
    digest of the stage's code: a manifest that records other inputs or code, or whose files are
    missing or altered, does not vouch, and the work runs again. The work's parameters annotated
    `Path` are upstream manifests: they are fetched (from a store) before use, and keyed by content.
    """

    def __init__(self, work: Callable[..., Written], name: str, output: Callable[..., StageOutput],
                 code: tuple[str, ...], ignore: tuple[str, ...], serializable: bool, options: dict[str, Any]) -> None:
        self.work, self.name, self.output, self.ignore = work, name, output, ignore
        self.code = source_digest(*(f"{PACKAGE}.{module}" for module in code), work.__module__)
        signature = inspect.signature(work)
        self.manifests = frozenset(name for name, parameter in signature.parameters.items()
                                   if parameter.annotation in (Path, "Path"))
        self._work_takes_refresh = "refresh" in signature.parameters
        if not self._work_takes_refresh:
            refresh = inspect.Parameter("refresh", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
            signature = signature.replace(parameters=[*signature.parameters.values(), refresh],
                                          return_annotation="Path")
        self.signature = signature
        functools.update_wrapper(self, work)  # its name, module and docstring
        self.__signature__ = signature
        self.task = _as_task(self, serializable, options)

    def fetched(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with each upstream manifest as a local path, fetched with its files where it is in a store."""
        return {name: storage.fetched_manifest(value) if name in self.manifests else value
                for name, value in inputs.items()}

    def expected(self, **inputs: Any) -> StageOutput:
        """The manifest these (fetched) inputs lead to, and every fact it must record to vouch for them."""
        manifest, facts = self.output(**_here(inputs))
        return manifest, facts | {"code": self.code}

    def __call__(self, *args: Any, **kwargs: Any) -> Path | str:
        """Return the manifest that vouches for these inputs' output, doing the work first where none does.

        `refresh=True` does the work even when the manifest vouches. The manifest comes back as a
        path, or as a URL where the output is in a store.
        """
        call = self.signature.bind(*args, **kwargs)
        call.apply_defaults()
        inputs = self.fetched(dict(call.arguments))
        refresh = inputs["refresh"] if self._work_takes_refresh else inputs.pop("refresh")
        manifest, facts = self.expected(**inputs)
        if not refresh and storage.read_verified(manifest, **facts):
            return storage.portable(manifest)
        written = self.work(**_here(inputs))
        path = write_manifest(manifest, written.files, **written.facts, **facts)
        storage.publish(path, written.files)
        return storage.portable(path)


def _here(inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with each folder in a store (a run or data folder) as its local mirror's path."""
    return {name: str(storage.local_path(value)) if name in FOLDERS and storage.is_remote(value) else value
            for name, value in inputs.items()}


def stage(name: str, *, output: Callable[..., StageOutput], code: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
          serializable: bool = False, **options: Any) -> Callable[[Callable[..., Written]], Stage]:
    """Make a stage's work function a Stage.

    Args:
        name: the stage's name, as `--refresh` and the Prefect UI show it.
        output: from the stage's inputs, without running it: the manifest's path and the facts it
            must record.
        code: the modules, besides the stage's own, whose code decides its output ("ml.model"), named
            relative to this package; a change to their code (not to comments) runs the stage again.
        ignore: inputs that cannot change the output: left out of the cache key.
        serializable: one run at a time per cache key, across processes: concurrent runs that share
            the output (experiments sharing a data folder) wait for the first and find it cached.
        options: further `@task` options (retries, retry_delay_seconds, ...); retries are for
            transient failures only (tasks/plumbing/failures.py).
    """
    return lambda work: Stage(work, name, output, code, ignore, serializable, options)


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + its code + its inputs; a key whose manifest no longer vouches is recomputed.

    When the manifest does not verify while a cached record exists, the key is withheld, so the task
    runs and rebuilds the files instead of handing on a stale path. `refresh=True` among the inputs
    forces a run the same way.
    """

    stage: Stage | None = field(default=None, repr=False)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if inputs.get("refresh"):
            return None
        inputs = self.stage.fetched(inputs)
        manifest, facts = self.stage.expected(**inputs)
        # The output's place is part of the key: two experiments whose inputs are alike in content
        # (the same training, run twice) keep records of their own, each handing on its own path.
        parts = [self.stage.code, input_digest(inputs, self.stage.ignore), storage.location_of(manifest)]
        key = f"{self.stage.name}-{digest_json(parts)[:32]}"
        # Only a cached record can hand on a stale path; without one the task runs, and the stage
        # itself checks the manifest: it is read once either way. Read from a store, it is fetched
        # here with its files, so that a machine that did not run the stage finds it `Cached`.
        if task_ctx.result_store.exists(key) and storage.read_verified(manifest, **facts) is None:
            return None
        return key


def _as_task(stage: Stage, serializable: bool, options: dict[str, Any]) -> Task:
    """The Prefect task of `stage`, cached by StageCache; `refresh` holds on its first attempt only."""

    @functools.wraps(stage)
    def attempt(*args: Any, **kwargs: Any) -> Path | str:
        call = stage.signature.bind(*args, **kwargs)
        call.arguments["refresh"] = call.arguments.get("refresh", False) and task_run.run_count <= 1  # a retry resumes
        manifest = stage(*call.args, **call.kwargs)
        await_server(stage.name)  # its state, and the next stage's start, go to the server
        return manifest

    attempt.__signature__ = stage.signature
    policy: CachePolicy = StageCache(stage=stage)
    if serializable:
        policy = policy.configure(isolation_level="SERIALIZABLE", lock_manager=FlockLockManager())
    # JSON cache records: a stage's result is a manifest's path, which needs no pickle.
    return task(attempt, name=stage.name, task_run_name=stage.name, cache_policy=policy, persist_result=True,
                result_serializer="json", retry_condition_fn=retry_transient, **options)
