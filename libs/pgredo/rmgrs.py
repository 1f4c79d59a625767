"""Imports every rmgr redo module so each registers its functions with the engine."""

from __future__ import annotations

from . import btree  # noqa: F401
from . import gin  # noqa: F401
from . import gist, spgist  # noqa: F401
from . import hashidx, brin  # noqa: F401
from . import heap  # noqa: F401
from . import slru  # noqa: F401
from . import xlog_seq_generic  # noqa: F401
from . import storage  # noqa: F401
