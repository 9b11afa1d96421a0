"""Prefect caching keyed by what decides a stage's output, and verified against what is on disk."""

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

from tasks.cache_locks import FlockLockManager
from tasks.failures import retry_transient
from tasks.files import digest_json, read_manifest, sha256_file

# A stage's manifest path and the facts it records for given inputs: what tells a finished,
# current output from a missing, altered or stale one.
StageOutput = tuple[Path, dict[str, Any]]


def source_digest(*modules: str) -> str:
    """Digest of the named modules' code, blind to comments, docstrings and formatting.

    Editing a comment or a docstring leaves it unchanged, so such edits do not invalidate the cache.
    The modules are read, not imported: a cached rerun never imports torch.
    """
    digest = hashlib.sha256()
    for module in modules:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and _is_docstring(body[0]):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree, annotate_fields=False).encode())
    return digest.hexdigest()


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


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + its code + its inputs; a key whose output is gone or altered is recomputed.

    `output(**inputs)` gives the manifest the stage writes and the facts it must record for these
    inputs. When that manifest does not verify while a cached record exists, the key is withheld,
    so the task runs and rebuilds the files instead of handing on a stale path. `refresh=True`
    among the inputs forces a run the same way. Inputs named in `ignore` cannot change the output.
    """

    stage: str = ""
    code: str = ""
    output: Callable[..., StageOutput] | None = field(default=None, repr=False)
    ignore: tuple[str, ...] = ()

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if inputs.get("refresh"):
            return None
        key = f"{self.stage}-{digest_json([self.code, input_digest(inputs, self.ignore)])[:32]}"
        if self.output is not None:
            manifest, facts = self.output(**inputs)
            if read_manifest(manifest, **facts) is None and task_ctx.result_store.exists(key):
                return None
        return key


def stage_task(
    fn: Callable[..., Path],
    *,
    name: str,
    output: Callable[..., StageOutput],
    code: str,
    ignore: tuple[str, ...] = (),
    serializable: bool = False,
    **options: Any,
) -> Task:
    """Wrap a stage's plain function as a Prefect task cached by StageCache.

    Args:
        fn: the plain function; it returns the path of the manifest it wrote.
        name: the stage's name, as `--refresh` and the Prefect UI show it.
        output: from the same arguments, without running the stage: that manifest's path and the
            facts it must record (see StageCache).
        code: `source_digest` of the modules whose code decides the output.
        ignore: inputs that cannot change the output (left out of the key).
        serializable: one run at a time per cache key, across processes: concurrent runs that share
            the output (experiments sharing a data folder) wait for the first and find it cached.
        options: further `@task` options (retries, retry_delay_seconds, ...); retries are for
            transient failures only (tasks/failures.py).
    """
    policy = StageCache(stage=name, code=code, output=output, ignore=ignore)
    if serializable:
        policy = policy.configure(isolation_level="SERIALIZABLE", lock_manager=FlockLockManager())
    # JSON cache records: a stage's result is a manifest's path, which needs no pickle.
    return task(_refresh_first_attempt_only(fn), name=name, task_run_name=name, cache_policy=policy,
                persist_result=True, result_serializer="json", retry_condition_fn=retry_transient, **options)


def _refresh_first_attempt_only(fn: Callable[..., Path]) -> Callable[..., Path]:
    """`fn` with `refresh` honoured on the task run's first attempt only: a retry resumes what it started."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def attempt(*args: Any, **kwargs: Any) -> Path:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        call.arguments["refresh"] = call.arguments["refresh"] and task_run.run_count <= 1
        return fn(*call.args, **call.kwargs)

    return attempt
