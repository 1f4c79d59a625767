"""Layer descriptors: a layer's kind, key range and LSN range, which are also its file name.

A delta layer holds versions with LSN in [lsn_start, lsn_end) of keys in [key_start,
key_end); an image layer holds every key of its range as of one LSN, written as the LSN
range [lsn, lsn + 1) so both kinds compare alike. Names (Neon's layer_name.rs has the
same idea; hex keys, 16-digit hex LSNs)::

    <key start>-<key end>__<lsn start>-<lsn end>.delta
    <key start>-<key end>__<lsn>.image
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ..keys import KEY_SIZE
from .blockfile import MAX_BOUND_SIZE, MAX_LSN, LayerKind
from .errors import StorageError

KEY_MIN: Final = bytes(KEY_SIZE)
KEY_MAX: Final = b"\xff" * (KEY_SIZE + 1)  # above every key: the end of the whole key space

_DELTA_NAME = re.compile(r"([0-9a-f]*)-([0-9a-f]+)__([0-9A-F]{16})-([0-9A-F]{16})\.delta")
_IMAGE_NAME = re.compile(r"([0-9a-f]*)-([0-9a-f]+)__([0-9A-F]{16})\.image")


class LayerNameError(StorageError, ValueError):
    """A file name that does not name a layer."""


@dataclass(frozen=True, slots=True)
class LayerDesc:
    """What a layer holds (not its contents): kind, key range [start, end), LSN range [start, end)."""

    kind: LayerKind
    key_start: bytes
    key_end: bytes
    lsn_start: int
    lsn_end: int

    def __post_init__(self) -> None:
        if not self.key_start < self.key_end or not 0 <= self.lsn_start < self.lsn_end <= MAX_LSN:
            raise LayerNameError(f"empty or invalid ranges for a layer: {self!r}")
        if len(self.key_start) > MAX_BOUND_SIZE or len(self.key_end) > MAX_BOUND_SIZE:
            raise LayerNameError("key range bounds are at most 32 bytes")
        if self.kind == LayerKind.IMAGE and self.lsn_end != self.lsn_start + 1:
            raise LayerNameError("an image layer's LSN range is [lsn, lsn + 1)")

    @classmethod
    def delta(cls, key_start: bytes, key_end: bytes, lsn_start: int, lsn_end: int) -> LayerDesc:
        return cls(LayerKind.DELTA, key_start, key_end, lsn_start, lsn_end)

    @classmethod
    def image(cls, key_start: bytes, key_end: bytes, lsn: int) -> LayerDesc:
        return cls(LayerKind.IMAGE, key_start, key_end, lsn, lsn + 1)

    @property
    def is_delta(self) -> bool:
        return self.kind == LayerKind.DELTA

    @property
    def is_image(self) -> bool:
        return self.kind == LayerKind.IMAGE

    @property
    def image_lsn(self) -> int:
        """The LSN of an image layer (lsn_start)."""
        return self.lsn_start

    @property
    def key_range(self) -> tuple[bytes, bytes]:
        return self.key_start, self.key_end

    @property
    def lsn_range(self) -> tuple[int, int]:
        return self.lsn_start, self.lsn_end

    @property
    def is_l0(self) -> bool:
        """A delta over the whole key space: what freezing the open layer makes."""
        return self.kind == LayerKind.DELTA and self.key_start <= KEY_MIN and self.key_end >= KEY_MAX

    def covers_key(self, key: bytes) -> bool:
        return self.key_start <= key < self.key_end

    def overlaps_keys(self, start: bytes, end: bytes) -> bool:
        return self.key_start < end and start < self.key_end

    @property
    def file_name(self) -> str:
        keys = f"{self.key_start.hex()}-{self.key_end.hex()}__"
        if self.kind == LayerKind.DELTA:
            return f"{keys}{self.lsn_start:016X}-{self.lsn_end:016X}.delta"
        return f"{keys}{self.lsn_start:016X}.image"

    def __str__(self) -> str:
        return self.file_name


def parse_layer_name(name: str) -> LayerDesc:
    """The descriptor a layer file name stands for; LayerNameError for any other name."""
    try:
        if m := _DELTA_NAME.fullmatch(name):
            return LayerDesc.delta(bytes.fromhex(m[1]), bytes.fromhex(m[2]), int(m[3], 16), int(m[4], 16))
        if m := _IMAGE_NAME.fullmatch(name):
            return LayerDesc.image(bytes.fromhex(m[1]), bytes.fromhex(m[2]), int(m[3], 16))
    except ValueError as e:  # odd-length hex, or ranges the descriptor refuses
        raise LayerNameError(f"{name!r} is not a layer file name: {e}") from None
    raise LayerNameError(f"{name!r} is not a layer file name")


def is_layer_name(name: str) -> bool:
    return bool(_DELTA_NAME.fullmatch(name) or _IMAGE_NAME.fullmatch(name))
