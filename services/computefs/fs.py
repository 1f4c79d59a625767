"""The lazy compute's filesystem (FUSE, pyfuse3): `base/` and `global/` of a data directory.

The mount's root holds the compute's `base/` and `global/` (the data directory
links to them). Two kinds of files live there:

- **segments**: every relation segment file that existed at the compute's
  start LSN, listed by the page server (ListRelations), sized as it says; their
  blocks come from GetPages at that LSN until the compute writes them
  (segments.py keeps the written blocks in a local sparse file). FSM forks are
  left out, as a base backup leaves them out (not WAL-logged; Postgres rebuilds
  them), and an unlogged relation's main fork reads its init fork.
- **plain files and directories**: everything else, passed through to a local
  directory (`upper`) that starts as the slim base backup's `base/` and
  `global/` (pg_control, pg_filenode.map, PG_VERSION, the database
  directories); files Postgres creates later (new relations, pg_internal.init,
  temporary files, CREATE DATABASE's directory) are plain files there too.

Every file is owned by the compute's OS user (0600 files, 0700 directories are
what Postgres makes; the mount uses `default_permissions`, so the kernel
checks them, and `allow_other`, since the daemon runs as root). Inode numbers
are never reused while mounted; the kernel's page cache is kept across opens
(everything changes through this mount). A kernel read of a segment is one
GetPages call in a worker thread, so reads of several backends proceed at once;
sequential reads are read ahead (prefetch.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pyfuse3
import trio

from pgformat.constants import BLCKSZ, FSM_FORKNUM, INIT_FORKNUM, MAIN_FORKNUM
from pgformat.datadir import DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, RELSEG_SIZE, relation_path

from .pages import PageSource, PageSourceError, RelationSize
from .prefetch import Prefetcher
from .segments import Segment

log = logging.getLogger(__name__)

CACHE_SECONDS: Final = 3600.0  # attributes and names change only through this mount
FETCH_THREADS: Final = 8


class ComputeFsError(RuntimeError):
    """The filesystem cannot serve this data directory; the message says why."""


@dataclass
class _Handle:
    ino: int
    fd: int | None = None  # a plain file
    seg: Segment | None = None


@contextmanager
def _os_errors() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None


def build_segments(relations: list[RelationSize], overlay: Path) -> dict[str, Segment]:
    """The segment files of every relation fork at the start LSN (the layout a base backup writes)."""
    unlogged = {(r.fork.spc, r.fork.db, r.fork.rel): r for r in relations if r.fork.fork == INIT_FORKNUM}
    out: dict[str, Segment] = {}
    for r in relations:
        f = r.fork
        if f.spc not in (DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID):
            raise ComputeFsError(f"relation {f.rel} of database {f.db} is in tablespace {f.spc}: a lazy compute "
                                 f"serves base/ and global/ only; use a full-copy compute for this branch")
        if f.fork == FSM_FORKNUM:
            continue
        source, nblocks = f, r.nblocks
        init = unlogged.get((f.spc, f.db, f.rel))
        if f.fork == MAIN_FORKNUM and init is not None:
            source, nblocks = init.fork, init.nblocks  # what ResetUnloggedRelations makes of it
        for segno in range(max(1, -(-nblocks // RELSEG_SIZE))):
            blocks = max(0, min(RELSEG_SIZE, nblocks - segno * RELSEG_SIZE))
            path = relation_path(f.spc, f.db, f.rel, f.fork, segno)
            out[path] = Segment(path, source, segno, blocks, blocks * BLCKSZ, overlay / path,
                                mtime_ns=time.time_ns())
    return out


class ComputeFs(pyfuse3.Operations):
    def __init__(self, upper: Path, overlay: Path, source: PageSource, relations: list[RelationSize],
                 uid: int, gid: int) -> None:
        super().__init__()
        self.upper = upper
        self.overlay = overlay
        self.source = source
        self.uid, self.gid = uid, gid
        self.segments = build_segments(relations, overlay)
        self.children: dict[str, set[str]] = {}
        for path in self.segments:
            parent, name = path.rsplit("/", 1)
            self.children.setdefault(parent, set()).add(name)
            (upper / parent).mkdir(parents=True, exist_ok=True)
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: ""}
        self.inodes: dict[str, int] = {"": pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self.handles: dict[int, _Handle] = {}
        self._dirs: dict[int, tuple[str, list[tuple[str, str]]]] = {}  # fh -> (directory, its entries)
        self._next_fh = 1
        self._limiter = trio.CapacityLimiter(FETCH_THREADS)
        self.prefetch = Prefetcher(self._fetch)  # its nursery is set by the main loop

    # -- names and attributes -------------------------------------------------------------

    def _ino(self, path: str) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self.inodes[path] = ino
            self.paths[ino] = path
        return ino

    def _path(self, ino: int) -> str:
        path = self.paths.get(ino)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    @staticmethod
    def _join(parent: str, name: bytes) -> str:
        n = os.fsdecode(name)
        if "/" in n or n in (".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return f"{parent}/{n}" if parent else n

    def _exists(self, path: str) -> bool:
        return path in self.segments or os.path.lexists(self.upper / path)

    def _attr(self, ino: int, path: str | None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        seg = self.segments.get(path) if path is not None else None
        handle = None
        if path is None or (seg is None and not os.path.lexists(self.upper / path)):
            handle = next((h for h in self.handles.values() if h.ino == ino), None)  # unlinked, still open
            if handle is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            seg = handle.seg
        if seg is not None:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_size = seg.size
            a.st_blocks = -(-seg.size // 512)
            a.st_nlink = 1
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = seg.mtime_ns
        else:
            with _os_errors():
                st = os.fstat(handle.fd) if handle is not None and handle.fd is not None \
                    else os.lstat(self.upper / path) if path is not None else None
            assert st is not None
            a.st_mode = st.st_mode
            a.st_size = st.st_size
            a.st_blocks = st.st_blocks
            a.st_nlink = st.st_nlink
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.st_ino = ino
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = BLCKSZ
        a.entry_timeout = a.attr_timeout = CACHE_SECONDS
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._join(self._path(parent_inode), name)
        if not self._exists(path):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._ino(path), path)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode, self.paths.get(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self.paths.get(inode)
        handle = self.handles.get(fh) if fh is not None else None
        seg = self.segments.get(path) if path is not None else None
        if seg is None and handle is not None:
            seg = handle.seg
        if fields.update_size:
            size = attr.st_size
            if seg is not None:
                fetched: dict[int, bytes] = {}
                blk = size // BLCKSZ
                if size % BLCKSZ and blk < seg.remote_blocks and not seg.is_written(blk):
                    fetched = await self._fetch(seg, [blk])
                with _os_errors():
                    seg.truncate(size, fetched, time.time_ns())
            else:
                with _os_errors():
                    if handle is not None and handle.fd is not None:
                        os.ftruncate(handle.fd, size)
                    elif path is not None:
                        os.truncate(self.upper / path, size)
        if fields.update_mode and seg is None and path is not None:
            with _os_errors():
                os.chmod(self.upper / path, stat.S_IMODE(attr.st_mode))
        if (fields.update_mtime or fields.update_atime) and seg is None and path is not None:
            with _os_errors():
                st = os.lstat(self.upper / path)
                os.utime(self.upper / path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(inode, path)

    # -- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        with _os_errors():
            names = set(os.listdir(self.upper / path))
        names |= self.children.get(path, set())
        fh = self._new_fh()
        self._dirs[fh] = (path, [(n, f"{path}/{n}" if path else n) for n in sorted(names)])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs[fh][1]
        for i in range(start_id, len(entries)):
            name, path = entries[i]
            if not self._exists(path):
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(self._ino(path), path), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        path = self._dirs[fh][0]
        with _os_errors():
            fd = os.open(self.upper / path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._join(self._path(parent_inode), name)
        if path in self.segments:
            raise pyfuse3.FUSEError(errno.EEXIST)
        with _os_errors():
            os.mkdir(self.upper / path, stat.S_IMODE(mode))
            os.chmod(self.upper / path, stat.S_IMODE(mode))
        return self._attr(self._ino(path), path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._join(self._path(parent_inode), name)
        if self.children.get(path):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        with _os_errors():
            os.rmdir(self.upper / path)
        self.children.pop(path, None)
        self._forget_path(path)

    # -- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        seg = self.segments.get(path)
        if seg is not None:
            h = _Handle(inode, seg=seg)
            if flags & os.O_TRUNC:
                seg.truncate(0, {}, time.time_ns())
        else:
            with _os_errors():
                fd = os.open(self.upper / path, os.O_RDWR | (flags & os.O_TRUNC))
            h = _Handle(inode, fd=fd)
        fh = self._new_fh()
        self.handles[fh] = h
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._join(self._path(parent_inode), name)
        ino = self._ino(path)
        if path in self.segments:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            info = await self.open(ino, flags, ctx)
        else:
            with _os_errors():
                fd = os.open(self.upper / path, os.O_RDWR | os.O_CREAT | (flags & (os.O_EXCL | os.O_TRUNC)),
                             stat.S_IMODE(mode))
            fh = self._new_fh()
            self.handles[fh] = _Handle(ino, fd=fd)
            info = pyfuse3.FileInfo(fh=fh, keep_cache=True)
        return info, self._attr(ino, path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        if h.seg is None:
            assert h.fd is not None
            with _os_errors():
                return os.pread(h.fd, size, off)
        seg = h.seg
        need = seg.blocks_to_fetch(off, size)
        fetched = {}
        if need:
            fetched = await self.prefetch.get(seg, need, off // BLCKSZ, -(-min(off + size, seg.size) // BLCKSZ))
        with _os_errors():
            return seg.read(off, size, fetched)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if h.seg is None:
            assert h.fd is not None
            with _os_errors():
                return os.pwrite(h.fd, buf, off)
        seg = h.seg
        partial = seg.partial_blocks(off, len(buf))
        fetched = await self._fetch(seg, partial) if partial else {}
        with _os_errors():
            return seg.write(off, buf, fetched, time.time_ns())

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        with _os_errors():
            if h.seg is not None:
                h.seg.fsync()
            elif h.fd is not None:
                (os.fdatasync if datasync else os.fsync)(h.fd)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h.fd is not None:
            os.close(h.fd)
        seg = h.seg
        if seg is not None and self.segments.get(seg.path) is not seg \
                and not any(o.seg is seg for o in self.handles.values()):
            seg.remove()  # unlinked while open: its last handle is gone

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._join(self._path(parent_inode), name)
        seg = self.segments.pop(path, None)
        if seg is not None:
            parent, leaf = path.rsplit("/", 1)
            self.children[parent].discard(leaf)
            if not any(h.seg is seg for h in self.handles.values()):
                seg.remove()
        else:
            with _os_errors():
                os.unlink(self.upper / path)
        self._forget_path(path)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = self._join(self._path(parent_inode_old), name_old)
        new = self._join(self._path(parent_inode_new), name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & pyfuse3.RENAME_NOREPLACE and self._exists(new):
            raise pyfuse3.FUSEError(errno.EEXIST)
        if old in self.segments:
            raise pyfuse3.FUSEError(errno.EXDEV)  # Postgres never renames a relation file
        if not self._exists(old):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if new in self.segments:
            await self.unlink(parent_inode_new, name_new, ctx)
        with _os_errors():
            os.rename(self.upper / old, self.upper / new)
        self._forget_path(new)
        for path, ino in list(self.inodes.items()):
            if path == old or path.startswith(old + "/"):
                moved = new + path[len(old):]
                del self.inodes[path]
                self.inodes[moved] = ino
                self.paths[ino] = moved

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.upper)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                     "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass  # inode numbers are never reused while mounted; names map to them until unlinked

    # -- helpers --------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _forget_path(self, path: str) -> None:
        ino = self.inodes.pop(path, None)
        if ino is not None:
            self.paths.pop(ino, None)

    async def _fetch(self, seg: Segment, blocks: list[int]) -> dict[int, bytes]:
        """The page server's pages of segment blocks `blocks`, by segment block number."""
        first = seg.first_blkno()
        try:
            pages = await trio.to_thread.run_sync(self.source.get_pages, seg.source, [first + b for b in blocks],
                                                  limiter=self._limiter)
        except PageSourceError as e:
            log.error("page server read failed", extra={"file": seg.path, "code": e.code.name, "error": str(e)})
            raise pyfuse3.FUSEError(errno.EIO) from None
        return {b - first: page for b, page in pages.items()}

    def local_bytes(self) -> int:
        """Disk the overlay's sparse files take (pages the compute wrote to relations it started with)."""
        return sum(s.local_bytes() for s in self.segments.values())
