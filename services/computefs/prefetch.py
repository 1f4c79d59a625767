"""Read-ahead for sequential scans of a lazy compute's relation segments.

The kernel asks for at most 128 KB at a time and waits for each answer, while
the page server answers several GetPages calls at once (its redo and storage
work runs in parallel): so when a read continues where the last read of the
same segment ended, the blocks after it are fetched in the background (half
a `window` at a time, whenever less than that is ahead), split into `parts`
concurrent calls, and kept in a bounded cache
the next reads take them from. A read that finds its blocks still in flight
waits for them instead of asking twice.

Pages in the cache are the page server's at the start LSN and never change;
a block the compute has written since is read from the overlay whatever the
cache holds (segments.py: the local copy always wins). A failed read-ahead is
dropped: the read that needs the blocks asks again and reports the error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from .segments import Segment

log = logging.getLogger(__name__)

Fetch = Callable[[Segment, list[int]], Awaitable[dict[int, bytes]]]


class Prefetcher:
    def __init__(self, fetch: Fetch, *, window: int = 128, parts: int = 4, budget_pages: int = 8192) -> None:
        self._fetch = fetch
        self.window = window
        self.parts = parts
        self.budget_pages = budget_pages
        self.nursery: trio.Nursery | None = None  # set once the filesystem runs; None: no read-ahead
        self._cache: OrderedDict[tuple[str, int], tuple[Segment, bytes]] = OrderedDict()
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._next: dict[str, int] = {}  # segment path -> block after its last read
        self.hits = 0

    async def get(self, seg: Segment, blocks: list[int], first: int, end: int) -> dict[int, bytes]:
        """The page server's pages of `blocks` (segment block numbers), from the cache where it has them,
        for a read of blocks [first, end)."""
        out: dict[int, bytes] = {}
        waiting: list[tuple[int, trio.Event]] = []
        missing: list[int] = []
        for b in blocks:
            key = (seg.path, b)
            hit = self._cache.pop(key, None)
            if hit is not None and hit[0] is seg:
                out[b] = hit[1]
                self.hits += 1
            elif key in self._inflight:
                waiting.append((b, self._inflight[key]))
            else:
                missing.append(b)
        sequential = self._next.get(seg.path) == first
        self._next[seg.path] = end
        if sequential:
            self._read_ahead(seg, end)
        if missing:
            out.update(await self.fetch(seg, missing))
        again: list[int] = []
        for b, event in waiting:
            await event.wait()
            hit = self._cache.pop((seg.path, b), None)
            if hit is not None and hit[0] is seg:
                out[b] = hit[1]
                self.hits += 1
            else:
                again.append(b)
        if again:
            out.update(await self.fetch(seg, again))
        return out

    async def fetch(self, seg: Segment, blocks: list[int]) -> dict[int, bytes]:
        """`blocks` in up to `parts` concurrent calls."""
        if len(blocks) <= 16 or self.parts <= 1:
            return await self._fetch(seg, blocks)
        size = -(-len(blocks) // self.parts)
        chunks = [blocks[i:i + size] for i in range(0, len(blocks), size)]
        results: list[dict[int, bytes]] = [{} for _ in chunks]
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                results[i] = await self._fetch(seg, chunks[i])
            except Exception as e:  # noqa: BLE001  (re-raised below, once every part is done)
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in range(len(chunks)):
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]
        out: dict[int, bytes] = {}
        for r in results:
            out.update(r)
        return out

    def _read_ahead(self, seg: Segment, start: int) -> None:
        """Keep at least half a window ahead of `start` cached or in flight, a half window at a time."""
        if self.nursery is None:
            return
        ahead = start
        while ahead < seg.remote_blocks and ahead < start + self.window and (
                (seg.path, ahead) in self._cache or (seg.path, ahead) in self._inflight or seg.is_written(ahead)):
            ahead += 1
        if ahead - start >= self.window // 2:
            return
        todo = [b for b in range(ahead, min(ahead + self.window // 2, seg.remote_blocks))
                if not seg.is_written(b) and (seg.path, b) not in self._cache and (seg.path, b) not in self._inflight]
        if not todo:
            return
        events = {b: trio.Event() for b in todo}
        for b, event in events.items():
            self._inflight[(seg.path, b)] = event
        self.nursery.start_soon(self._run, seg, events)

    async def _run(self, seg: Segment, events: dict[int, trio.Event]) -> None:
        try:
            pages = await self.fetch(seg, list(events))
        except Exception as e:  # noqa: BLE001  (dropped: the read that needs these blocks asks again)
            log.warning("read-ahead failed", extra={"file": seg.path, "error": str(e)})
            pages = {}
        for b, event in events.items():
            key = (seg.path, b)
            if b in pages:
                self._cache[key] = (seg, pages[b])
            self._inflight.pop(key, None)
            event.set()
        while len(self._cache) > self.budget_pages:
            self._cache.popitem(last=False)
