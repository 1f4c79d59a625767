"""Errors of the layer storage package.

One small hierarchy: `StorageError` at the root, a damaged file (`LayerCorruptError`,
`ManifestError`) apart from a caller's mistake (`LayerWriteError`). A damaged file is
always named, with the key or block where the damage was found when that is known;
the page server maps LayerCorruptError to DATA_LOSS.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage package's errors."""


class LayerCorruptError(StorageError):
    """A layer file does not hold what its own checksums and structure say: damaged or truncated.

    Raised instead of ever returning data from a damaged part of a file.
    """

    def __init__(self, file: str, detail: str, *, key: bytes | None = None, block: int | None = None) -> None:
        self.file, self.detail, self.key, self.block = file, detail, key, block
        where = []
        if block is not None:
            where.append(f"block {block}")
        if key is not None:
            where.append(f"key {key.hex()}")
        at = f" ({', '.join(where)})" if where else ""
        super().__init__(f"layer file {file} is corrupt{at}: {detail}")


class LayerWriteError(StorageError, ValueError):
    """A writer was used wrongly: an entry out of order or outside the layer's ranges, a finished writer."""


class ValueFormatError(StorageError, ValueError):
    """Bytes that are not an encoded value (see values.py)."""


class ManifestError(StorageError):
    """A manifest that cannot be trusted: damaged, of an unknown format, or naming missing layers."""

    def __init__(self, file: str, detail: str) -> None:
        self.file, self.detail = file, detail
        super().__init__(f"manifest {file}: {detail}")


class StoreError(StorageError):
    """A layer store refused an operation (a name taken, not found, not a valid file name)."""
