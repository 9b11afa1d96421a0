"""Atomic file writes and the manifests that tell a finished stage output from a partial one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO


def nearest_existing(folder: Path) -> Path:
    """`folder` (made absolute) if it exists, else its nearest existing parent."""
    folder = Path(folder).absolute()
    while not os.path.exists(folder):  # False, not an error, for a path this user may not look into
        folder = folder.parent
    return folder


@contextmanager
def made_folder(folder: Path) -> Iterator[None]:
    """Create `folder` and its missing parents for the block; afterwards remove those it created that
    are empty (a run that failed before its first output leaves no empty folder behind)."""
    existing = nearest_existing(folder)
    created = [path for path in (Path(folder).absolute(), *Path(folder).absolute().parents)
               if path != existing and existing in path.parents]  # deepest first
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for path in created:
            try:
                path.rmdir()
            except OSError:  # not empty: kept, and so are its parents
                break


def _file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, algorithm).hexdigest()  # block by block: flat memory for any size


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes; a file unchanged since this process hashed it (the same inode, size
    and modification time: every write here replaces a file, or at least touches it) is not read again."""
    status = os.stat(path)
    identity = (os.path.abspath(path), status.st_ino, status.st_size, status.st_mtime_ns)
    if (known := _hashed.get(identity)) is None:
        known = _hashed[identity] = _file_digest(path, "sha256")
    return known


_hashed: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256, for this process


def md5_file(path: Path) -> str:
    """Hex md5 of a file: how the dataset's publishers name its files' checksums."""
    return _file_digest(path, "md5")


def digest_json(value: Any) -> str:
    """Hex sha256 of a value's canonical JSON (sorted keys; paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(stream)` into a temporary sibling, fsync it, then rename it over `path`.

    A reader, or a run killed half-way, sees either the old file or the whole new one. An OSError
    (a full disk, say) names `path`, not the temporary file.
    """
    with naming(path, hidden=f".{path.name}."):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                os.fchmod(stream.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; give it the mode open() would
                recording = _RecordingStream(stream)
                try:
                    write(recording)  # type: ignore[arg-type]  (a stream's write and flush)
                except Exception:
                    if recording.error is not None:  # torch.save, say, reports its stream's OSError as RuntimeError
                        raise recording.error from None
                    raise
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it races other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0)  # elsewhere: set and restored at once
    os.umask(mask)
    return mask


class _RecordingStream:
    """A binary stream's write and flush, keeping the OSError they raise for the caller to see."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.error = stream, None

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def naming(path: Path, hidden: str | None = None) -> Iterator[None]:
    """Within the block, an OSError that names no file (a write, an fsync), or a file whose name starts
    with `hidden` (a temporary one), names `path`."""
    try:
        yield
    except OSError as error:
        named = os.fsdecode(error.filename) if error.filename is not None else None
        if named is None or (hidden is not None and Path(named).name.startswith(hidden)):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def atomic_write_json(path: Path, value: Any) -> Path:
    """Write `value` as indented JSON, atomically."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda stream: stream.write(text.encode()))


@dataclass(frozen=True)
class Written:
    """What a stage's work wrote: the files its manifest vouches for, and facts to record beside them."""

    files: list[Path]
    facts: dict[str, Any] = field(default_factory=dict)


def write_manifest(path: Path, files: Iterable[Path], **facts: Any) -> Path:
    """Record a finished output: the sha256 of each file (relative to the manifest's folder) and some facts.

    The manifest is written last, so its presence means every file it names was complete.
    """
    root = path.parent
    checksums = {str(Path(file).resolve().relative_to(root.resolve())): sha256_file(Path(file)) for file in files}
    return atomic_write_json(path, {"files": checksums, **facts})


def read_manifest(path: Path, fetch: Callable[[Path], bool] | None = None, **expected: Any) -> dict[str, Any] | None:
    """The manifest at `path` if it records the `expected` facts and every file it names is intact, else None.

    With `fetch`, a file that is missing or altered is fetched again (from a store) and checked once more.
    """
    try:
        manifest = json.loads(Path(path).read_text())
        if any(manifest.get(name) != value for name, value in expected.items()):
            return None
        root = Path(path).parent
        intact = all(_intact(root / name, checksum, fetch) for name, checksum in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if intact else None


def _intact(file: Path, checksum: str, fetch: Callable[[Path], bool] | None) -> bool:
    if file.is_file() and sha256_file(file) == checksum:
        return True
    return fetch is not None and fetch(file) and sha256_file(file) == checksum
