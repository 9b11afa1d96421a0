"""Where runs and data live: a local folder, or a folder in an object store (s3://, gs://, any fsspec URL).

Stages always work on local files. A store URL has a local mirror, `<cache>/<scheme>/<bucket>/<key>`,
and the store is the truth: a stage fetches what it reads (each file checked against the sha256 its
manifest records, so nothing is downloaded twice) and publishes what its manifest names, the manifest
last, so that a manifest in the store always vouches for files that are there. `location_of` maps a
mirror path back to its URL.

Every function here is a no-op for a path outside the mirror cache: a local folder stays the fast path,
and stages need no `if url:` of their own. The drivers (s3fs, gcsfs) are optional: `pip install -e ".[s3]"`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fashion_pipeline.tasks.plumbing.files import read_manifest

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

CACHE_ENV = "FASHION_STORE_CACHE"  # where this machine mirrors store URLs (default: ~/.cache/fashion-pipeline/stores)
LEASE_ENV = "FASHION_LEASE_SECONDS"  # how long a store lease outlives its last renewal
# Between writing a lease and reading it back: a run that wrote at the same moment has written by
# then, and the last writer holds it. Longer than a store's write takes, shorter than a person notices.
SETTLE_SECONDS = 0.2
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
# The extra that installs each driver, by scheme: what an ImportError from fsspec is told to install.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# Options for a scheme's driver. Every fetched file is checked against its manifest's sha256; botocore's
# own check of a whole object's checksum fails on S3-compatible servers that answer with a multipart
# upload's checksum of parts, so it is left to where S3 requires it.
DRIVER_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"response_checksum_validation": "when_required"}},
}


class StoreError(OSError):
    """A store that cannot be used as asked: its driver missing, its bucket missing, its credentials refused."""


def scheme_of(location: str) -> str:
    """The URL scheme of a location ("s3", "gs", "file"), or "" for a plain path."""
    match = URL.match(str(location))
    return match.group(1).lower() if match else ""


def is_remote(location: str | Path) -> bool:
    """Whether a location is in a store rather than on this machine's file system."""
    return not isinstance(location, Path) and scheme_of(location) not in ("", "file")


def plain(location: str) -> str:
    """A location as it is kept: a `file://` URL as its local path, anything else as given."""
    return URL.match(location).group(2) if scheme_of(location) == "file" else location


def cache_root() -> Path:
    """The folder that mirrors store URLs on this machine."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).absolute() / "fashion-pipeline" / "stores"


def local_path(location: str | Path) -> Path:
    """Where a location's files are on this machine: the path itself, or a store URL's mirror."""
    if isinstance(location, Path) or not is_remote(location):
        return Path(plain(str(location)))
    scheme, rest = scheme_of(location), URL.match(location).group(2)
    parts = [part for part in PurePosixPath(rest).parts if part not in ("/", ".")]
    return cache_root().joinpath(scheme, *parts)


def location_of(path: str | Path) -> str:
    """The inverse of `local_path`: a mirror path's store URL, any other path as a string."""
    if not isinstance(path, Path):
        return path
    absolute, root = path.absolute(), cache_root()
    if root not in absolute.parents:
        return str(path)
    scheme, *rest = absolute.relative_to(root).parts
    return f"{scheme}://{'/'.join(rest)}"


def join(location: str, *parts: str) -> str:
    """A location below `location`: a URL joined with '/', a path with the OS's separator."""
    if is_remote(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(plain(location)).joinpath(*parts))


def check(location: str) -> None:
    """Raise StoreError, in one line, unless the store of `location` can be used here: its driver
    installed, its bucket there, its credentials accepted. Nothing is written; a bucket that passed
    is not asked again by this process."""
    if not is_remote(location):
        return
    scheme = scheme_of(location)
    bucket = URL.match(location).group(2).split("/", 1)[0]
    if (scheme, bucket) in _reached:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = f'pip install -e ".[{extra}]"' if extra else f"install the fsspec driver for {scheme}://"
        raise StoreError(f"the driver for {scheme}:// is not installed: {hint}") from None
    except ValueError:
        raise StoreError(f"unknown storage scheme {scheme}://; use a local folder, file://, s3:// or gs://") from None
    try:
        filesystem, _ = _filesystem(location)  # the process's client for the store: made once, used by every stage
        filesystem.ls(bucket, detail=False)
    except FileNotFoundError:
        raise StoreError(f"bucket {bucket!r} does not exist") from None
    except PermissionError as error:
        raise StoreError(f"the store refused these credentials for {scheme}://{bucket} ({_short(error)})") from None
    except Exception as error:  # noqa: BLE001  (a driver's own errors: unreachable endpoint, bad region, ...)
        raise StoreError(f"cannot reach {scheme}://{bucket}: {_short(error)}") from None
    _reached.add((scheme, bucket))


_reached: set[tuple[str, str]] = set()  # (scheme, bucket) that `check` has reached


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def _remote(path: Path) -> tuple[AbstractFileSystem, str] | None:
    """The store and its path for a mirror path; None for a path outside the mirror cache."""
    url = location_of(Path(path))
    return _filesystem(url) if is_remote(url) else None


def _filesystem(url: str, **options: Any) -> tuple[AbstractFileSystem, str]:
    import fsspec

    return fsspec.url_to_fs(url, **DRIVER_OPTIONS.get(scheme_of(url), {}), **options)


# What this process last fetched or published, per local file: its (size, mtime) then and the
# store object's identity. A file unchanged since is not sent or fetched again.
_synced: dict[Path, tuple[tuple[int, int], Any]] = {}
_synced_lock = threading.Lock()


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_size, status.st_mtime_ns


def _identity(info: dict[str, Any]) -> Any:
    """What tells one version of a store object from another: its ETag or hash where the store gives one."""
    for name in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(name):
            return info[name]
    return info.get("size"), str(info.get("LastModified") or info.get("mtime") or info.get("updated"))


def _remember(path: Path, identity: Any) -> None:
    with _synced_lock:
        _synced[path.absolute()] = (_stat(path), identity)


def _in_step(path: Path, identity: Any = None) -> bool:
    """Whether `path` is as this process last synced it (and, given `identity`, the store's object is too)."""
    with _synced_lock:
        known = _synced.get(path.absolute())
    return known is not None and known[0] == _stat(path) and (identity is None or known[1] == identity)


def fetch(path: Path, identity: Any = None) -> bool:
    """Download the store's copy of a mirror path, atomically; False when the store has none (or the
    path is not a mirror). `identity`: the object's, where a listing gave it (else one request less)."""
    remote = _remote(path)
    if remote is None:
        return False
    filesystem, key = remote
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            filesystem.get_file(key, temporary)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except FileNotFoundError:
        return False
    _remember(path, identity)
    return True


def send(path: Path) -> None:
    """Upload a mirror path to the store (an object store's PUT replaces an object whole), unless this
    process sent or fetched it unchanged already."""
    remote = _remote(path)
    if remote is None or _in_step(path):
        return
    filesystem, key = remote
    before = _stat(path)  # a file written to meanwhile must not count as sent
    filesystem.put_file(str(path), key)
    filesystem.invalidate_cache(key)
    with _synced_lock:
        _synced[path.absolute()] = (before, _identity(filesystem.info(key)))


def _delete(filesystem: AbstractFileSystem, keys: Iterable[str]) -> None:
    keys = list(keys)
    if keys:
        filesystem.rm(keys)
        for key in keys:
            filesystem.invalidate_cache(key)


def read_verified(manifest: Path, **expected: Any) -> dict[str, Any] | None:
    """`read_manifest`, from the store where `manifest` is a mirror path: the store's manifest is
    fetched, and each file it names that is missing or altered here is downloaded and checked again.

    Without a manifest in the store, a local one does not vouch either: the store is the truth.
    """
    if _remote(manifest) is None:
        return read_manifest(manifest, **expected)
    if not fetch(manifest):
        Path(manifest).unlink(missing_ok=True)
        return None
    return read_manifest(manifest, fetch=fetch, **expected)


def fetched_manifest(location: str | Path) -> Path:
    """An upstream stage's manifest (a path, or a URL in a store) as a local path; from a store, fetched
    with the files it names. A local one is left to the stage that reads it: it is the fast path."""
    path = local_path(location)
    if _remote(path) is not None and read_verified(path) is None:
        raise StoreError(f"{location_of(path)} is not in the store, or its files there do not match it")
    return path


def portable(path: Path) -> Path | str:
    """What a stage hands on for a file it wrote: its path, or its URL where it is a store's mirror, so
    that any machine can find it."""
    url = location_of(path)
    return url if is_remote(url) else path


def publish(manifest: Path, files: Iterable[Path]) -> None:
    """Put a stage's output in the store: its files, then its manifest, last.

    A stage's TensorBoard events (`events.out.tfevents.*.<stage>`) replace its older ones, locally
    (tasks/plumbing/tensorboard_files.py) and so in the store: there those no longer here are removed,
    so that TensorBoard on the store shows each point once.
    """
    if _remote(manifest) is None:
        return
    files = [Path(file) for file in files]
    for file in files:
        send(file)
    for folder, suffix in {(file.parent, file.name.rpartition(".")[2]) for file in files
                           if file.name.startswith("events.out.tfevents.")}:
        push(folder, [f"events.out.tfevents.*.{suffix}"])
    send(manifest)


def publish_files(files: Iterable[Path]) -> None:
    """Upload files that no manifest names (a run's metrics.json and summary.png, a sweep's sweep.json)."""
    for file in files:
        send(Path(file))


def discard(path: Path) -> None:
    """Remove a mirror path's object from the store, if there is one."""
    remote = _remote(path)
    if remote is not None:
        filesystem, key = remote
        filesystem.invalidate_cache(key)
        if filesystem.exists(key):
            _delete(filesystem, [key])


def _matching(filesystem: AbstractFileSystem, key: str, patterns: list[str]) -> dict[str, dict[str, Any]]:
    """The store's objects below `key` whose paths relative to it match a pattern: relative path -> info."""
    filesystem.invalidate_cache(key)
    try:
        found = filesystem.find(key, detail=True)
    except FileNotFoundError:
        return {}
    prefix = key.rstrip("/") + "/"
    return {name.removeprefix(prefix): info for name, info in found.items()
            if name.startswith(prefix) and any(fnmatch.fnmatchcase(name.removeprefix(prefix), pattern)
                                               for pattern in patterns)}


def _local_matching(folder: Path, patterns: list[str]) -> set[str]:
    return {str(path.relative_to(folder)) for pattern in patterns for path in folder.glob(pattern) if path.is_file()}


def push(folder: Path, patterns: list[str]) -> None:
    """Make the store's files of `folder` that match `patterns` those of the mirror: new and changed
    ones uploaded, those gone here removed."""
    remote = _remote(folder)
    if remote is None:
        return
    filesystem, key = remote
    here = _local_matching(folder, patterns)
    # Checksum files before what they vouch for, as they are written: a push cut short leaves no
    # checkpoint in the store that cannot be verified.
    for name in sorted(here, key=lambda name: (not name.endswith(".sha256"), name)):
        send(folder / name)
    _delete(filesystem, (f"{key}/{name}" for name in _matching(filesystem, key, patterns) if name not in here))


def pull(folder: Path, patterns: list[str]) -> None:
    """Make the mirror's files of `folder` that match `patterns` those of the store: the store is the truth."""
    remote = _remote(folder)
    if remote is None:
        return
    filesystem, key = remote
    there = _matching(filesystem, key, patterns)
    for name, info in sorted(there.items()):
        if not _in_step(folder / name, _identity(info)):
            fetch(folder / name, _identity(info))
    for name in _local_matching(folder, patterns) - set(there):
        (folder / name).unlink(missing_ok=True)


def published(path: Path) -> bool:
    """Whether a file is where a rerun finds it: on this machine's disk, or in its store for a mirror path."""
    remote = _remote(path)
    if remote is None:
        return path.exists()
    filesystem, key = remote
    filesystem.invalidate_cache(key)
    return filesystem.exists(key)


def exists(location: str) -> bool:
    """Whether a file exists at a location: in its store, or on this machine."""
    return published(local_path(location))


def result_storage(location: str) -> Any:
    """Prefect result storage for the cache records of stages writing below `location`: a folder in
    its store, so that any machine finds a finished stage `Cached`; None (Prefect's default, in the
    Prefect home) for a local folder."""
    return _records_block(join(location, ".prefect-cache")) if is_remote(location) else None


@functools.cache
def _records_block(basepath: str) -> Any:
    """A RemoteFileSystem block for `basepath`, saved on the Prefect server (once per process): Prefect
    takes only saved blocks as a task's result storage, so that its workers can load them by id.
    Loaded where an earlier run saved it already: a read costs the server less than a save."""
    from prefect.exceptions import ObjectNotFound
    from prefect.filesystems import RemoteFileSystem

    name = f"fashion-pipeline-records-{hashlib.sha256(basepath.encode()).hexdigest()[:16]}"
    wanted = RemoteFileSystem(basepath=basepath, settings=DRIVER_OPTIONS.get(scheme_of(basepath), {}))
    try:
        saved = RemoteFileSystem.load(name)
    except (ObjectNotFound, ValueError):  # not saved yet (ValueError: Prefect's word for a missing block)
        saved = None
    if saved is not None and (saved.basepath, saved.settings) == (wanted.basepath, wanted.settings):
        return saved
    wanted.save(name, overwrite=True)
    return wanted


# --- a lease in the store: one run of an experiment at a time, across machines --------------------------


class LeaseHeld(Exception):
    """Another run holds the lease; the message names it."""


@contextmanager
def lease(folder: Path, owner_text: Callable[[dict[str, Any]], str]) -> Iterator[None]:
    """Hold `<folder>/.lease` in the store for the block; LeaseHeld if another live run holds it.

    A store has no lock that dies with its holder, so the lease expires unless renewed: a thread renews
    it while the block runs, and a run killed by SIGKILL leaves one that expires after
    FASHION_LEASE_SECONDS (or at once, for a rerun on the same machine, whose dead process it names).
    Two runs that take it at the same moment both read it back after writing: the later writer wins.

    Args:
        folder: a mirror path (a run directory in a store).
        owner_text: how the refusal names the holder, from its record (host, pid, expires).
    """
    remote = _remote(folder / ".lease")
    if remote is None:
        yield
        return
    filesystem, key = remote
    seconds = float(os.environ.get(LEASE_ENV, "60"))
    mine = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}

    def read() -> dict[str, Any] | None:
        filesystem.invalidate_cache(key)
        try:
            return json.loads(filesystem.cat_file(key))
        except (FileNotFoundError, ValueError):
            return None

    def write() -> None:
        filesystem.pipe_file(key, json.dumps(mine | {"expires": time.time() + seconds}).encode())

    held = read()
    if held and held.get("owner") != mine["owner"] and _alive(held):
        raise LeaseHeld(owner_text(held))
    write()
    time.sleep(SETTLE_SECONDS)
    if (held := read()) and held.get("owner") != mine["owner"]:
        raise LeaseHeld(owner_text(held))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            try:
                if (held := read()) and held.get("owner") != mine["owner"]:
                    # Lapsed (renewals failed, the machine slept) and taken: never overwrite the new holder's.
                    logging.getLogger("fashion").warning("The lease on %s was taken by another run: %s",
                                                         location_of(folder), owner_text(held))
                    return
                write()
            except Exception:  # noqa: BLE001  (a store hiccup: the next renewal tries again, well before expiry)
                continue

    renewer = threading.Thread(target=renew, name="store-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            if (held := read()) and held.get("owner") == mine["owner"]:
                filesystem.rm_file(key)
        except Exception:  # noqa: BLE001  (the store unreachable: the lease expires by itself)
            logging.getLogger("fashion").warning("The lease on %s was not released; it expires in %d s",
                                                 location_of(folder), seconds)


def _alive(record: dict[str, Any]) -> bool:
    """Whether a lease's holder may still be running: unexpired, and not a dead process of this machine."""
    if record.get("expires", 0) < time.time():
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True
