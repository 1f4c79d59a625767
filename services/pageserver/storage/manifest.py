"""A timeline's manifest: its live layer files and disk_consistent_lsn, replaced atomically.

What the manifest lists is the timeline: a layer file not listed is an orphan (a crash
between writing it and the manifest naming it; delete it at start), a listed file that is
missing or of another size is damage the page server must report, never paper over. Every
flush, compaction and GC ends by saving a new manifest (LayerStore.put: temp file, fsync,
rename, directory fsync). Neon's counterpart is the timeline's index_part.json /
metadata (pageserver/src/tenant/metadata.rs).

Format: a first line `ZENITH-MANIFEST`, one line of JSON (`format_version`,
`disk_consistent_lsn`, `layers`: [{`name`, `size`}], `extra`: free-form values the page
server keeps beside them), and a last line `crc32c=<8 hex digits>` over everything before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from .blockfile import MAX_LSN, crc32c
from .errors import ManifestError
from .layer_desc import LayerDesc, LayerNameError, is_layer_name, parse_layer_name
from .store import LayerStore

MANIFEST_NAME: Final = "manifest"
MANIFEST_VERSION: Final = 1
_FIRST_LINE: Final = b"ZENITH-MANIFEST\n"
_CRC_PREFIX: Final = b"crc32c="


@dataclass
class Manifest:
    """The live layers (file name -> size in bytes) and what is durable in them."""

    disk_consistent_lsn: int
    layers: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def descs(self) -> list[LayerDesc]:
        return [parse_layer_name(n) for n in sorted(self.layers)]

    def add_layer(self, desc: LayerDesc, size: int) -> None:
        self.layers[desc.file_name] = size

    def remove_layer(self, desc: LayerDesc) -> None:
        del self.layers[desc.file_name]


def encode_manifest(m: Manifest) -> bytes:
    if not 0 <= m.disk_consistent_lsn <= MAX_LSN:
        raise ValueError(f"disk_consistent_lsn {m.disk_consistent_lsn} out of range")
    doc = {
        "format_version": MANIFEST_VERSION,
        "disk_consistent_lsn": m.disk_consistent_lsn,
        "layers": [{"name": n, "size": m.layers[n]} for n in sorted(m.layers)],
        "extra": m.extra,
    }
    body = _FIRST_LINE + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return body + _CRC_PREFIX + f"{crc32c(body):08x}".encode() + b"\n"


def decode_manifest(data: bytes, file: str = MANIFEST_NAME) -> Manifest:
    """Parse and check a manifest; ManifestError naming `file` on any damage."""
    if not data.startswith(_FIRST_LINE):
        raise ManifestError(file, "not a manifest (first line)")
    if not data.endswith(b"\n"):
        raise ManifestError(file, "truncated (no final newline)")
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1
    crc_line = data[cut:-1]
    if cut <= len(_FIRST_LINE) or not crc_line.startswith(_CRC_PREFIX):
        raise ManifestError(file, "truncated (no checksum line)")
    digits = crc_line[len(_CRC_PREFIX):]
    if len(digits) != 8 or digits.strip(b"0123456789abcdef"):
        raise ManifestError(file, "unreadable checksum line")
    if int(digits, 16) != crc32c(data[:cut]):
        raise ManifestError(file, "checksum mismatch")
    try:
        doc = json.loads(data[len(_FIRST_LINE):cut])
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(file, f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(file, "not a JSON object")
    version = doc.get("format_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(file, f"format version {version!r}, this build reads {MANIFEST_VERSION}")
    lsn = doc.get("disk_consistent_lsn")
    if not isinstance(lsn, int) or isinstance(lsn, bool) or not 0 <= lsn <= MAX_LSN:
        raise ManifestError(file, f"bad disk_consistent_lsn {lsn!r}")
    extra = doc.get("extra", {})
    rows = doc.get("layers")
    if not isinstance(extra, dict) or not isinstance(rows, list):
        raise ManifestError(file, "layers or extra of the wrong type")
    layers: dict[str, int] = {}
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"name", "size"}:
            raise ManifestError(file, f"bad layer entry {row!r}")
        name, size = row["name"], row["size"]
        if not isinstance(name, str) or not _is_int(size) or size < 0:
            raise ManifestError(file, f"bad layer entry {row!r}")
        try:
            parse_layer_name(name)
        except LayerNameError as e:
            raise ManifestError(file, str(e)) from None
        if name in layers:
            raise ManifestError(file, f"layer {name} listed twice")
        layers[name] = size
    return Manifest(lsn, layers, extra)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def save_manifest(store: LayerStore, m: Manifest, name: str = MANIFEST_NAME) -> None:
    """Replace the manifest atomically and durably. Every layer it lists must be in the store
    already (written and published first)."""
    store.put(name, encode_manifest(m))


def load_manifest(store: LayerStore, name: str = MANIFEST_NAME, *, check_layers: bool = True) -> Manifest | None:
    """The store's manifest, None if it has none. With `check_layers`, every layer it lists must
    be in the store with the listed size (ManifestError naming the missing or damaged ones)."""
    try:
        data = store.read(name)
    except FileNotFoundError:
        return None
    m = decode_manifest(data, name)
    if check_layers:
        missing, wrong = [], []
        for layer, size in sorted(m.layers.items()):
            try:
                actual = store.size(layer)
            except FileNotFoundError:
                missing.append(layer)
                continue
            if actual != size:
                wrong.append(f"{layer} ({actual} bytes, listed as {size})")
        if missing:
            raise ManifestError(name, f"{len(missing)} listed layer file(s) missing: {', '.join(missing)}")
        if wrong:
            raise ManifestError(name, f"layer file(s) of the wrong size: {', '.join(wrong)}")
    return m


def orphan_layers(store: LayerStore, m: Manifest | None) -> list[str]:
    """Layer files in the store the manifest does not list (left by a crash before the manifest
    named them): safe to delete before the timeline is served."""
    live = m.layers if m is not None else {}
    return [n for n in store.list() if is_layer_name(n) and n not in live]
