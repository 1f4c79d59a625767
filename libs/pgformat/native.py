"""Which implementation of the hot page operations runs: compiled or pure Python.

`pgformat._native` (libs/pgformat/_native.c, built by `make install`) holds
compiled twins of page_add_item_extended, pglz_decompress and the heap tuple
building of insert redo. The pure-Python functions stay the reference: tests
run both and compare them byte for byte. When the extension is not built,
this module logs that once and `compiled` is None, so every caller takes
its Python path.

Callers read `native.compiled` at call time (not at import), so
:func:`use_compiled` switches every caller at once.
"""

from __future__ import annotations

import logging
from types import ModuleType

log = logging.getLogger(__name__)

try:
    from . import _native as _built
except ImportError as e:
    _built = None
    log.warning("pgformat._native is not built (%s): page operations and pglz run in pure Python, "
                "several times slower; `make install` builds it", e)

#: The compiled module when built and enabled, else None.
compiled: ModuleType | None = _built


def available() -> bool:
    """Whether the extension is built (whatever use_compiled says)."""
    return _built is not None


def use_compiled(enabled: bool) -> bool:
    """Use the compiled operations (when built) or the pure-Python reference; returns the previous setting."""
    global compiled
    previous = compiled is not None
    compiled = _built if enabled else None
    return previous
