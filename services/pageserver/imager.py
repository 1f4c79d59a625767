"""Image layers made in the background, as Neon's compaction makes image layers.

Every `interval` seconds each timeline is asked how much WAL a read at its
last LSN may replay above the newest image layer in reach
(maintenance.image_debt). When that reaches `min_wal` bytes and a quarter
of that layer's size, a new layer is written: at once if ingest has gone
quiet since the last look; on a busy timeline, once the debt is four times
the threshold and at most every BUSY_SPACING passes (it still gets layers,
without rewriting one while the last is barely written). A timeline whose
layer failed is left alone until it ingests more WAL.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from .maintenance import image_debt
from .storage.errors import StorageError
from .repository import LayerCancelledError, Repository, RepositoryError, Timeline

log = logging.getLogger(__name__)

DEFAULT_INTERVAL: Final = 10.0
DEFAULT_MIN_WAL: Final = 16 << 20
BUSY_FACTOR: Final = 4
BUSY_SPACING: Final = 6


class ImageLayerMaker:
    """The background thread; `run_once` is one pass (tests call it directly)."""

    def __init__(self, repo: Repository, interval: float = DEFAULT_INTERVAL,
                 min_wal: int = DEFAULT_MIN_WAL) -> None:
        self.repo = repo
        self.interval = interval
        self.min_wal = min_wal
        self._seen: dict[int, int] = {}  # timeline id -> last record LSN at the previous pass
        self._failed_at: dict[int, int] = {}  # timeline id -> last record LSN when its layer failed
        self._passes = 0
        self._made_at: dict[int, int] = {}  # timeline id -> pass that last wrote its layer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="image-layers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # a pass must never end the thread
                log.exception("image layer pass failed")

    def run_once(self) -> list[Timeline]:
        """Write a layer for every timeline that is due; return them."""
        made: list[Timeline] = []
        self._passes += 1
        for tenant in self.repo.list_tenants():
            for tl in self.repo.list_timelines(tenant):
                if self._stop.is_set():
                    return made
                if self._due(tl):
                    lsn = tl.last_record_lsn
                    try:
                        self.repo.create_image_layer(tl, lsn, cancel=self._stop)
                        made.append(tl)
                        self._made_at[tl.id] = self._passes
                    except LayerCancelledError:
                        return made
                    except (RepositoryError, StorageError, ValueError) as e:  # redo and format errors are ValueErrors
                        self._failed_at[tl.id] = lsn
                        log.warning("image layer of timeline %s at %X failed: %s", tl.timeline, lsn, e)
        return made

    def _due(self, tl: Timeline) -> bool:
        last = tl.last_record_lsn
        quiet = self._seen.get(tl.id) == last
        self._seen[tl.id] = last
        if self._failed_at.get(tl.id) == last:
            return False
        debt, image_bytes = image_debt(self.repo, tl)
        threshold = max(self.min_wal, image_bytes // 4)
        if debt < threshold:
            return False
        if quiet:
            return True
        spaced = self._passes - self._made_at.get(tl.id, -BUSY_SPACING) >= BUSY_SPACING
        return debt >= BUSY_FACTOR * threshold and spaced
