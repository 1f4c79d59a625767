"""Where layer files live: a small interface with a disk and an in-memory implementation.

Layer files are immutable once written: a writer streams a new file under a temporary
name and `finish` publishes it atomically (fsync'd, renamed into place, directory
fsync'd); nobody sees a half-written file, and a name is never reused for other bytes.
Small mutable files (the manifest) are replaced whole with `put`, just as atomically.
Readers read by position (pread), so one open file serves any number of threads.

dulwich's `BaseObjectStore` / `DiskObjectStore` / `MemoryObjectStore` are the model: the
engine is tested against `MemoryLayerStore`, `DiskLayerStore` is tested for durability.
A name is a plain file name (no directories); one store holds one timeline's files.
"""

from __future__ import annotations

import abc
import os
import threading
import uuid
from pathlib import Path
from typing import Final, Self

from .errors import StoreError

TEMP_PREFIX: Final = ".tmp-"


def check_name(name: str) -> str:
    """A file name a store accepts: non-empty, no separators, not hidden, not a temporary name."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or name != name.strip():
        raise StoreError(f"not a valid layer store file name: {name!r}")
    return name


class FileWriter(abc.ABC):
    """A new file being written: `write` appends, `pwrite` patches bytes already written (a header
    filled in at the end), `finish` publishes it, `abort` throws it away."""

    name: str

    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def pwrite(self, data: bytes, offset: int) -> None: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def finish(self, name: str | None = None) -> int:
        """Publish the file (atomically and durably) under its name, or under `name` when given (a
        layer whose name depends on what was written); returns its size."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Forget the file; the name stays free. Safe to call twice or after a failed finish."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class FileReader(abc.ABC):
    """An open immutable file. Stays readable after the file is deleted (as an open fd does)."""

    name: str

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at the end of the file)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerStore(abc.ABC):
    """The files of one timeline: immutable layers plus small replaceable files."""

    @abc.abstractmethod
    def create(self, name: str) -> FileWriter:
        """A writer for a new file; `finish` raises StoreError if the name exists by then."""

    @abc.abstractmethod
    def put(self, name: str, data: bytes) -> None:
        """Write or atomically replace a small file (the manifest)."""

    @abc.abstractmethod
    def open(self, name: str) -> FileReader:
        """Open a file for reading; FileNotFoundError if there is none."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file; FileNotFoundError if there is none. Open readers keep working."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """Names of every published file, sorted."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Size of a file; FileNotFoundError if there is none."""

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str) -> bytes:
        """A whole (small) file."""
        with self.open(name) as f:
            return f.pread(f.size, 0)


# --- in memory ---------------------------------------------------------------------------


class _MemoryWriter(FileWriter):
    def __init__(self, store: MemoryLayerStore, name: str) -> None:
        self.name, self._store, self._buf, self._done = name, store, bytearray(), False

    def write(self, data: bytes) -> None:
        self._check()
        self._buf += data

    def pwrite(self, data: bytes, offset: int) -> None:
        self._check()
        if offset < 0 or offset + len(data) > len(self._buf):
            raise StoreError(f"{self.name}: pwrite beyond what was written ({offset}+{len(data)})")
        self._buf[offset:offset + len(data)] = data

    @property
    def size(self) -> int:
        return len(self._buf)

    def finish(self, name: str | None = None) -> int:
        self._check()
        if name is not None:
            self.name = check_name(name)
        self._store._publish(self.name, bytes(self._buf), replace=False)
        self._done = True
        return len(self._buf)

    def abort(self) -> None:
        self._done, self._buf = True, bytearray()

    def _check(self) -> None:
        if self._done:
            raise StoreError(f"{self.name}: writer already finished or aborted")


class _MemoryReader(FileReader):
    def __init__(self, name: str, data: bytes) -> None:
        self.name, self._data = name, data

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, length: int, offset: int) -> bytes:
        return self._data[offset:offset + length]


class MemoryLayerStore(LayerStore):
    """Files as bytes in a dict: for engine tests. `files` may be edited by tests (to damage one)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _publish(self, name: str, data: bytes, *, replace: bool) -> None:
        with self._lock:
            if not replace and name in self.files:
                raise StoreError(f"{name} already exists")
            self.files[name] = data

    def create(self, name: str) -> FileWriter:
        return _MemoryWriter(self, check_name(name))

    def put(self, name: str, data: bytes) -> None:
        self._publish(check_name(name), bytes(data), replace=True)

    def open(self, name: str) -> FileReader:
        try:
            return _MemoryReader(name, self.files[name])
        except KeyError:
            raise FileNotFoundError(f"no file {name} in the memory store") from None

    def delete(self, name: str) -> None:
        with self._lock:
            if self.files.pop(name, None) is None:
                raise FileNotFoundError(f"no file {name} in the memory store")

    def list(self) -> list[str]:
        return sorted(self.files)

    def size(self, name: str) -> int:
        try:
            return len(self.files[name])
        except KeyError:
            raise FileNotFoundError(f"no file {name} in the memory store") from None


# --- on disk -----------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _DiskWriter(FileWriter):
    _BUFFER: Final = 1 << 20

    def __init__(self, store: DiskLayerStore, name: str) -> None:
        self.name, self._store = name, store
        self._tmp = store.root / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        self._f = open(self._tmp, "xb", buffering=self._BUFFER)  # noqa: SIM115 -- closed by finish/abort
        self._size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._check()
        self._f.write(data)
        self._size += len(data)

    def pwrite(self, data: bytes, offset: int) -> None:
        self._check()
        if offset < 0 or offset + len(data) > self._size:
            raise StoreError(f"{self.name}: pwrite beyond what was written ({offset}+{len(data)})")
        self._f.flush()
        os.pwrite(self._f.fileno(), data, offset)

    @property
    def size(self) -> int:
        return self._size

    def finish(self, name: str | None = None) -> int:
        self._check()
        if name is not None:
            self.name = check_name(name)
        final = self._store.root / self.name
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            try:
                os.link(self._tmp, final)  # unlike rename, never replaces an existing file
            except FileExistsError:
                raise StoreError(f"{final} already exists") from None
            self._tmp.unlink()
            fsync_dir(self._store.root)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self._size

    def abort(self) -> None:
        self._done = True
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def _check(self) -> None:
        if self._done:
            raise StoreError(f"{self.name}: writer already finished or aborted")


class _DiskReader(FileReader):
    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self._path = path
        self._fd = -1
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        if self._fd < 0:
            raise StoreError(f"{self._path} is closed")
        data = os.pread(self._fd, length, offset)
        while len(data) < length:  # a regular file returns short reads only at its end
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class DiskLayerStore(LayerStore):
    """Files in one directory. Temporary files of writers that never finished (a crash) are
    removed when the store is opened."""

    def __init__(self, root: Path | str, *, create: bool = True, clean: bool = True) -> None:
        """`clean=False` leaves temporary files alone: for reading a store another process owns."""
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise StoreError(f"{self.root} is not a directory")
        if clean:
            for p in self.root.glob(f"{TEMP_PREFIX}*"):
                p.unlink(missing_ok=True)

    def create(self, name: str) -> FileWriter:
        return _DiskWriter(self, check_name(name))

    def put(self, name: str, data: bytes) -> None:
        final = self.root / check_name(name)
        tmp = self.root / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def open(self, name: str) -> FileReader:
        return _DiskReader(self.root / check_name(name), name)

    def delete(self, name: str) -> None:
        (self.root / check_name(name)).unlink()
        fsync_dir(self.root)

    def list(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_file())

    def size(self, name: str) -> int:
        return (self.root / check_name(name)).stat().st_size
