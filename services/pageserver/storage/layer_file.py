"""What delta and image layer readers and writers share: opening a layer file of a store by
name (its header must agree with its name), the descriptor and counts, and the writer's
key and LSN range checks."""

from __future__ import annotations

from typing import Self

from ..keys import KEY_SIZE
from .blockfile import (
    BLOCK_TARGET,
    BlockFileReader,
    BlockFileWriter,
    LayerHeader,
    LayerKind,
    entry_key,
)
from .errors import LayerCorruptError, LayerWriteError, ValueFormatError
from .layer_desc import LayerDesc, LayerNameError, is_layer_name, parse_layer_name
from .store import FileReader, LayerStore
from .values import Value, decode_value, encode_value


class LayerFileReader:
    """An open layer file of one kind."""

    KIND: LayerKind

    def __init__(self, f: FileReader, *, cache_blocks: int = 16) -> None:
        self._file = BlockFileReader(f, self.KIND, cache_blocks)
        h = self._file.header
        self.desc = LayerDesc(h.kind, h.key_start, h.key_end, h.lsn_start, h.lsn_end)
        if is_layer_name(f.name) and parse_layer_name(f.name) != self.desc:
            self._file.close()
            raise LayerCorruptError(f.name, f"its header says it is {self.desc.file_name}")

    @classmethod
    def open(cls, store: LayerStore, name: str, *, cache_blocks: int = 16) -> Self:
        """Open layer file `name` of `store` (FileNotFoundError if it is not there)."""
        return cls(store.open(name), cache_blocks=cache_blocks)

    @property
    def name(self) -> str:
        return self._file.name

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        return self.desc.key_range

    @property
    def lsn_range(self) -> tuple[int, int]:
        return self.desc.lsn_range

    @property
    def entry_count(self) -> int:
        return self._file.n_entries

    @property
    def key_count(self) -> int:
        """Number of distinct keys."""
        return self._file.n_keys

    @property
    def file_size(self) -> int:
        return self._file.file_size

    @property
    def block_count(self) -> int:
        return self._file.n_blocks

    def _decode(self, raw: bytes, ekey: bytes) -> Value:
        try:
            return decode_value(raw)
        except ValueFormatError as e:
            raise LayerCorruptError(self.name, str(e), key=ekey[:KEY_SIZE]) from None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayerFileWriter:
    """Streams a layer into a new file of a store; `finish` publishes it under its descriptor's name."""

    KIND: LayerKind

    def __init__(self, store: LayerStore, desc: LayerDesc, block_target: int = BLOCK_TARGET) -> None:
        if desc.kind != self.KIND:
            raise LayerWriteError(f"a {self.KIND.name.lower()} writer for {desc}")
        self.desc = desc
        out = store.create(desc.file_name)
        try:
            self._w = BlockFileWriter(out, LayerHeader(desc.kind, desc.key_start, desc.key_end, desc.lsn_start,
                                                       desc.lsn_end), block_target)
        except BaseException:
            out.abort()
            raise

    @property
    def entry_count(self) -> int:
        return self._w.n_entries

    @property
    def approx_size(self) -> int:
        return self._w.approx_size

    def _add(self, key: bytes, lsn: int, value: bytes) -> None:
        d = self.desc
        if len(key) != KEY_SIZE:
            raise LayerWriteError(f"{d}: a key of {len(key)} bytes, expected {KEY_SIZE}")
        if not d.key_start <= key < d.key_end:
            raise LayerWriteError(f"{d}: key {key.hex()} outside the layer's key range")
        if not d.lsn_start <= lsn < d.lsn_end:
            raise LayerWriteError(f"{d}: LSN {lsn:X} outside the layer's LSN range")
        self._w.add(entry_key(key, lsn), value)

    def _encode(self, value: Value) -> bytes:
        try:
            return encode_value(value)
        except ValueFormatError as e:
            raise LayerWriteError(f"{self.desc}: {e}") from None

    def finish(self, key_end: bytes | None = None) -> LayerDesc:
        """Publish the layer; `key_end` may narrow the key range to end at or above the last key
        written. Returns the layer's descriptor (its file name)."""
        d = self.desc
        if key_end is not None and key_end != d.key_end:
            try:
                d = LayerDesc(d.kind, d.key_start, key_end, d.lsn_start, d.lsn_end)
            except LayerNameError as e:
                raise LayerWriteError(str(e)) from None
        self._w.finish(key_end, d.file_name)
        self.desc = d
        return d

    def abort(self) -> None:
        self._w.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
