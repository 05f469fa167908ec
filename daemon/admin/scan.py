"""A long keyset scan of the chunks in id order, with a checkpoint in
outboxd.scan_progress, so an interrupted job (a backfill, a reindex build)
resumes after the last page it finished instead of starting again."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from db.scans import ScanRepository

# one page: (the checkpoint to start after, the page size) -> (chunks scanned, the last id scanned)
Page = Callable[[UUID | None, int], Awaitable[tuple[int, UUID | None]]]


@dataclass
class ScanResult:
    job: str
    scanned: int = 0  # in this run (a resumed one does not count again what it skips)
    resumed: bool = False
    already_complete: bool = False


class CheckpointedScan:
    def __init__(self, pool: AsyncConnectionPool, job: str, page_size: int) -> None:
        self.pool = pool
        self.db = ScanRepository(pool)
        self.job = job
        self.page_size = page_size

    async def run(self, page: Page, *, restart: bool = False, advance: Callable[[int], None] = lambda n: None,
                  ) -> ScanResult:
        """Call page(after, limit) until a page comes back short, from the checkpoint
        on (restart: from the first chunk). page moves the checkpoint itself, in the
        same statement as its work where it can (save() otherwise), so a crash
        between pages neither loses nor repeats one."""
        result = ScanResult(self.job)
        if restart:
            await self.db.reset(self.job)
        progress = await self.db.progress(self.job)
        if progress and progress["completed_at"]:
            result.already_complete = True
            return result
        after = progress["last_chunk_id"] if progress else None
        result.resumed = after is not None
        if progress:
            advance(progress["done"])
        while True:
            scanned, last = await page(after, self.page_size)
            result.scanned += scanned
            advance(scanned)
            if scanned < self.page_size:
                break
            after = last
        await self.db.complete(self.job)
        return result

    async def save(self, last_chunk_id: UUID, done: int) -> None:
        await self.db.save(self.job, last_chunk_id, done)
