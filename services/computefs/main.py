"""zenith-computefs: mount a lazy compute's base/ and global/ (see fs.py) until SIGTERM or unmount.

    zenith-computefs --mountpoint M --upper U --overlay O --pageserver HOST:PORT \\
        --timeline TL --lsn X/X --uid 107 --gid 114

`--upper` holds the slim base backup's base/ and global/ (plain files), `--overlay`
the sparse files of relation segments the compute writes; both start empty of
overlay state (a compute's start rebuilds them). The mount is ready once M is a
mount point. Exit status 2: FUSE is not available here (the message says what
to do).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from pathlib import Path

from pgformat.controlfile import parse_control_file
from pgformat.lsn import parse_lsn
from services.auth import SecurityConfigError, add_security_arguments, client_security
from services.runtime import configure_logging

log = logging.getLogger("computefs")

EXIT_NO_FUSE = 2
FUSE_DEVICE = "/dev/fuse"


class FuseUnavailableError(RuntimeError):
    """This machine or container cannot mount FUSE filesystems."""


def check_fuse(device: str = FUSE_DEVICE) -> None:
    """FuseUnavailableError, saying what to do, unless the FUSE device can be opened and libfuse loaded."""
    advice = ("a container needs `--device /dev/fuse --cap-add SYS_ADMIN` (compose: `devices: [/dev/fuse]`, "
              "`cap_add: [SYS_ADMIN]`); or use a full-copy compute (`zctl pg create NAME --branch B` "
              "without --lazy)")
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as e:
        what = "does not exist" if e.errno == errno.ENOENT else f"cannot be opened ({e.strerror})"
        raise FuseUnavailableError(f"FUSE is unavailable: {device} {what}; {advice}") from None
    os.close(fd)
    try:
        import pyfuse3  # noqa: F401  (libfuse3 is loaded with it)
    except ImportError as e:
        raise FuseUnavailableError(f"FUSE is unavailable: pyfuse3 cannot be loaded ({e}); install Debian's fuse3 "
                                   f"and libfuse3-dev, then `make install`") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zenith-computefs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mountpoint", required=True, type=Path)
    p.add_argument("--upper", required=True, type=Path, help="plain files: the slim backup's base/ and global/")
    p.add_argument("--overlay", required=True, type=Path, help="sparse files of written relation segments")
    p.add_argument("--pageserver", required=True, metavar="HOST:PORT")
    p.add_argument("--tenant", default="0" * 32)
    p.add_argument("--timeline", required=True)
    p.add_argument("--lsn", required=True, metavar="X/X",
                   help="the compute's start LSN (its base backup's); '-': read it from the first line of "
                        "standard input (start-up then overlaps fetching the backup into --upper)")
    p.add_argument("--uid", type=int, default=os.getuid(), help="owner the files show (the compute's OS user)")
    p.add_argument("--gid", type=int, default=os.getgid())
    p.add_argument("--log-level", default="info")
    add_security_arguments(p, server=False, client=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        check_fuse()
    except FuseUnavailableError as e:
        log.error(str(e))
        print(f"zenith-computefs: {e}", file=sys.stderr)
        return EXIT_NO_FUSE

    import pyfuse3
    import trio

    from .fs import ComputeFs, ComputeFsError
    from .pages import PageSource, PageSourceError

    lsn_text = args.lsn if args.lsn != "-" else sys.stdin.readline().strip()
    if not lsn_text:
        log.info("no start LSN given: the compute's start was abandoned")
        return 1
    lsn = parse_lsn(lsn_text)
    control = parse_control_file((args.upper / "global" / "pg_control").read_bytes())
    try:
        security = client_security(args, dict(os.environ))
    except SecurityConfigError as e:
        print(f"zenith-computefs: {e}", file=sys.stderr)
        return 1
    source = PageSource(args.pageserver, args.tenant, args.timeline, lsn,
                        checksums=control.data_checksum_version != 0, security=security)
    try:
        fs = ComputeFs(args.upper, args.overlay, source, source.list_relations(), args.uid, args.gid)
    except (ComputeFsError, PageSourceError) as e:
        log.error(f"cannot serve the compute's relations: {e}")
        print(f"zenith-computefs: {e}", file=sys.stderr)
        return 1
    options = set(pyfuse3.default_options) | {"allow_other", "fsname=zenith-computefs", "subtype=computefs"}
    try:
        pyfuse3.init(fs, str(args.mountpoint), options)
    except RuntimeError as e:
        log.error(f"mounting {args.mountpoint} failed: {e}")
        print(f"zenith-computefs: mounting {args.mountpoint} failed: {e}", file=sys.stderr)
        return EXIT_NO_FUSE
    log.info("mounted", extra={"mountpoint": str(args.mountpoint), "timeline": args.timeline, "lsn": lsn_text,
                               "segments": len(fs.segments)})

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            fs.prefetch.nursery = nursery
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted", extra={"mountpoint": str(args.mountpoint), "pages_fetched": source.pages_fetched,
                                     "calls": source.calls, "read_ahead_hits": fs.prefetch.hits,
                                     "overlay_bytes": fs.local_bytes()})
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
