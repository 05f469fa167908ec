"""The story `outboxd demo` tells, step by step: PostgreSQL up, a sample
corpus written the way an application writes, the daemon converging the
collection, example hybrid searches, then a chunk edited, a document retitled
and another deleted, with the points following; what to try next.

It runs on the embedded stores of daemon.demo.embedded; its SQL is in
db/sql/demo.sql.
"""
from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qdrant_client import models
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from daemon.commands.common import console
from daemon.commands.search import excerpt
from daemon.core.qdrant_connect import make_client
from daemon.corpus import document_url, load_corpus
from daemon.demo.embedded import EmbeddedStores, shown, stop_on_sigterm
from daemon.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, ConfigError
from daemon.hybrid_search import hybrid_search
from daemon.outbox.notify_daemon import NotifyDaemon
from daemon.runtime.retry import wait_for_any
from daemon.runtime.service import run_service
from db.demo import DemoContent
from db.gateway import make_pool

# Example searches, each showing something off: both sides agreeing, an exact
# code, a paraphrase that shares no word with its answer (vector only), and
# the keyword side lifting the vector side's 4th candidate to the top.
QUERIES = [
    "retry after a deadlock",
    "23505",
    "what happens when the sun runs out of fuel?",
    "first published computer program",
]
QUERY_DOCS = ("postgres-troubleshooting", "stellar-lifecycle", "analytical-engine")  # never deleted

# The edits, on documents of the shipped corpus (found by url, which no edit changes).
TEXT_EDIT_DOC, TEXT_EDIT_CHUNK = "coffee-brewing", 1  # this chunk gets a new text...
EDIT_QUERY = "cold brew coffee"  # ...that this query finds: before the edit, the chunk ranks 3rd
EDIT_TEXTS = (  # alternating, so that every run of the demo really changes the text
    "Cold brew coffee: steep coarse grounds in cold water in the fridge for twelve to sixteen hours, "
    "then filter. It tastes smooth and low in acid, and keeps for a week.",
    "Cold brew coffee: steep one part coarse grounds in eight parts cold water overnight, then filter "
    "twice. Dilute the concentrate with water or milk to taste.",
)
TITLE_EDIT_DOC = "cast-iron-care"  # retitled: a payload-only change
TITLE_SUFFIX = " (2nd edition)"
DELETE_DOC = "chess-openings"  # deleted (a later run deletes another one)
SEARCH_HINT = 'search "how do I season a pan?"'
TOO_FEW = "   too few documents are left from earlier runs to edit; `outboxd demo --fresh` starts over"
SETTLED_EVERY = 0.25  # seconds between looks at whether the daemon has applied everything
PROGRESS_LINE_EVERY = 5.0  # seconds between progress lines when not on a terminal


def _secs(seconds: float) -> str:
    return f"{seconds:.1f} s"


def _prog() -> str:
    """outboxd as the user started it (`.venv/bin/outboxd`, say), for the suggested commands."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name != "outboxd":  # python -m daemon.cli
        return "outboxd"
    on_path = shutil.which("outboxd")
    if on_path and Path(on_path).resolve() == Path(argv0).resolve():
        return "outboxd"
    return argv0


class Interrupted(Exception):
    """The daemon stopped before the story was told (Ctrl-C, SIGTERM, a failure)."""


@dataclass
class Edits:
    """What the edit step changed, to show the points following."""

    text_chunk: Any = None
    text_title: str = ""
    text_index: int = 0
    text_before: str = ""
    text_after: str = ""
    title_before: str = ""
    title_after: str = ""
    retitled_chunks: list = field(default_factory=list)
    deleted_title: str = ""
    deleted_chunks: int = 0


class Demo:
    def __init__(self, settings, stores: EmbeddedStores, *, hint: tuple[list[str], list[str]],
                 started: float | None = None) -> None:
        self.settings = settings
        self.stores = stores
        self.started = time.monotonic() if started is None else started  # for "Done in"
        self.demo_dir = stores.demo_dir
        # (VARIABLE=value words before the command, flags after it) that point another command at the demo
        self.hint_env, self.hint_flags = hint
        # Piped (a CI log, a README), tables get a fixed, readable width.
        self.console = console(highlight=False)
        self.told = False  # the story reached its end (else a stop cut it short)

    @property
    def dsn(self) -> str | None:
        return self.stores.dsn

    def say(self, text: str = "") -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def step(self, n: int, title: str) -> None:
        self.console.print()
        self.console.print(Text(f"{n}. {title}", style="bold"), soft_wrap=True)

    # --- the sync part: PostgreSQL and the corpus -----------------------------------------------
    def run(self, *, fresh: bool) -> int:
        self.say(f"outboxd demo: everything runs embedded, in {shown(self.demo_dir)}")
        self.say("(wiped by --fresh)" if fresh else "(`outboxd demo --fresh` wipes it and starts over)")

        self.step(1, "PostgreSQL")
        t = time.perf_counter()
        self.stores.start_postgres()
        self.say(f"   PostgreSQL 16 from the pgserver wheel, in {shown(self.stores.pgdata)}: "
                 f"up, schema migrated  {_secs(time.perf_counter() - t)}")

        self.step(2, "A sample corpus, written the way an application writes")
        try:
            return asyncio.run(self.pipeline())
        finally:
            stop_on_sigterm()  # closing the loop reset it

    async def load_corpus(self) -> None:
        t = time.perf_counter()
        # a pool of its own: the daemon's opens with the daemon, after this step
        async with make_pool(self.dsn, application_name="outboxd:demo", min_size=1, max_size=1) as pool:
            content = DemoContent(pool)
            loaded = await content.document_count() == 0
            if loaded:
                await load_corpus(pool)  # one transaction
            counts = await content.corpus_counts()
        documents, chunks, pending = counts["documents"], counts["chunks"], counts["pending"]
        if loaded:
            self.say(f"   {documents} documents, {chunks} chunks inserted in one transaction  {_secs(time.perf_counter() - t)}")
            self.say(f"   the capture triggers queued {pending} outbox events in that same transaction")
        else:
            self.say(f"   loaded by an earlier run: {documents} documents, {chunks} chunks; {pending} outbox events pending")

    # --- the async part: the daemon, searches, edits ---------------------------------------------
    async def pipeline(self) -> int:
        await self.load_corpus()  # step 2, before the daemon's own pool opens
        qdrant_path = self.settings.local_qdrant_path
        try:
            client = make_client(self.settings)  # one client for the daemon and the searches
        except ConfigError:  # the folder is open in another process
            print(
                f"outboxd demo: {qdrant_path} is open in another process (an `{self.hint('run')}`?); "
                "Qdrant's local mode allows one process at a time: stop it first.",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        daemon = NotifyDaemon(self.settings, self.dsn, qdrant=client)
        try:
            self.step(3, "The daemon: claim, embed, upsert, acknowledge")
            t = time.perf_counter()
            # The daemon runs as `outboxd run` runs it (the listener, the verifier, readiness;
            # Ctrl-C and SIGTERM stop it through the shell), the story beside it, watched alike.
            code = await run_service(daemon, side_tasks={"demo": lambda: self.story(daemon, client, t)})
        finally:
            stop_on_sigterm()  # the shell handed SIGTERM back to its default
            await client.close()  # the daemon closed its pool and the model; the client is ours
        if code != EXIT_OK:
            return code
        if not self.told:  # a first Ctrl-C or SIGTERM: the daemon stopped cleanly, the demo was interrupted
            return EXIT_INTERRUPTED
        self.next_steps()
        return EXIT_OK

    async def story(self, daemon, client, started: float) -> None:
        """Steps 3 to 5, beside the running daemon; then the daemon's stop. A stop
        before the end (Ctrl-C, SIGTERM, a failure, which the log tells) ends it quietly."""
        try:
            self.say(f"   model {daemon.writer.embedder.fingerprint} loaded  {_secs(time.perf_counter() - started)}")
            self.say(f"   Qdrant local mode in {shown(Path(self.settings.local_qdrant_path))}: "
                     f"alias {self.settings.collection!r} → collection {daemon.writer.store.collection!r}")
            await self.converge(daemon, client)

            self.go_on(daemon)
            self.step(4, "Hybrid search: Qdrant's vector similarity + PostgreSQL's full text, fused")
            self.say("   (vec, kw: the hit's rank among each side's candidates; — : not among them)")
            for q in QUERIES:
                await self.search(daemon, client, q)

            self.go_on(daemon)
            self.step(5, "Changes follow: edit a chunk, retitle a document, delete a document")
            await self.edit_and_follow(daemon, client)
        except Interrupted:
            return  # the stop is set: the shell finishes the batches in flight
        self.told = True
        daemon.stop.set()  # told: the daemon stops as after a Ctrl-C, with nothing in flight

    @staticmethod
    def go_on(daemon) -> None:
        if daemon.stop.is_set():
            raise Interrupted

    async def count_points(self, client, document_id=None) -> int:
        flt = None if document_id is None else models.Filter(
            must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=str(document_id)))])
        return (await client.count(self.settings.collection, count_filter=flt, exact=True)).count

    async def _progress(self, daemon) -> tuple[int, int]:
        """(chunks with text, those of them with no event pending)."""
        chunks, pending = await DemoContent(daemon.pool).progress()
        return chunks, chunks - pending

    @staticmethod
    def mark(daemon) -> tuple[float, dict[str, int]]:
        """Now, and the daemon's counters: what drain() measures from."""
        return time.perf_counter(), asdict(daemon.stats)

    async def settled(self, daemon) -> bool:
        """Whether the running daemon has applied everything: nothing pending (dead
        letters aside) and no batch in flight, what `outboxd run --drain` ends on; else
        False after a short wait. A stop ends the story (Interrupted)."""
        if (await daemon.outbox.pending()).pending == 0 and not daemon.heartbeat.in_flight:
            return True
        await wait_for_any([daemon.stop], SETTLED_EVERY)
        self.go_on(daemon)
        return False

    async def drain(self, daemon, since: tuple[float, dict[str, int]], *, progress: bool) -> tuple[float, dict[str, int]]:
        """Wait until the running daemon has applied everything pending: with a
        progress bar of converged chunks on a terminal, a line every few seconds
        elsewhere. Returns the seconds and the daemon's counters since `since` (mark())."""
        t, before = since
        if progress and self.console.is_terminal:
            total, done = await self._progress(daemon)
            with Progress(
                TextColumn("   converging"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                TimeElapsedColumn(), console=self.console, transient=True,
            ) as bar:
                job = bar.add_task("converging", total=total, completed=done)
                while not await self.settled(daemon):
                    total, done = await self._progress(daemon)
                    bar.update(job, total=total, completed=done)
        else:
            last, looked = None, time.perf_counter()
            while not await self.settled(daemon):
                if progress and time.perf_counter() - looked >= PROGRESS_LINE_EVERY:
                    looked = time.perf_counter()
                    if (now := await self._progress(daemon)) != last:
                        self.say(f"   converging: {now[1]}/{now[0]} chunks  {time.perf_counter() - t:.0f} s")
                        last = now
        after = asdict(daemon.stats)
        return time.perf_counter() - t, {k: after[k] - before[k] for k in after}

    async def converge(self, daemon, client) -> None:
        seconds, stats = await self.drain(daemon, self.mark(daemon), progress=True)
        total, _ = await self._progress(daemon)
        points = await self.count_points(client)
        self.say(f"   converged: {points} points for {total} chunks with text  {_secs(seconds)}")
        self.say(f"   ({stats['embedded']} texts embedded, {stats['events_acked']} events acknowledged"
                 f" in {stats['batches']} batch{'es' if stats['batches'] != 1 else ''})")
        if stats["dead_letters"]:
            self.say(f"   {stats['dead_letters']} events became dead letters: `outboxd dead-letters list` shows why")

    async def search(self, daemon, client, text: str, *, limit: int = 3, mark=None) -> list:
        t = time.perf_counter()
        hits = await hybrid_search(daemon.pool, client, self.settings.collection, daemon.writer.embedder, text, limit=limit)
        ms = (time.perf_counter() - t) * 1000
        self.say()
        self.say(f'   "{text}"  {ms:.0f} ms')
        if not hits:
            self.say("   (no hits)")
            return hits
        rows = [
            (str(rank), f"{h.score:.3f}", "—" if h.vector_rank is None else str(h.vector_rank),
             "—" if h.keyword_rank is None else str(h.keyword_rank), excerpt(h.title or "", 34),
             ("(edited) " if mark is not None and str(h.chunk_id) == str(mark) else "") + h.text)
            for rank, h in enumerate(hits, 1)
        ]
        title_w = max(len("title"), *(len(r[4]) for r in rows))
        excerpt_w = max(30, self.console.width - 25 - title_w)

        def line(n, score, vec, kw, title, text):
            return f"   {n:>2} {score:>6} {vec:>4} {kw:>3}  {title:<{title_w}}  {excerpt(text, excerpt_w)}"

        self.console.print(Text(line("#", "score", "vec", "kw", "title", "excerpt"), style="dim"), soft_wrap=True)
        for r in rows:
            self.say(line(*r))
        return hits

    # --- the edits -----------------------------------------------------------------------
    async def edit_and_follow(self, daemon, client) -> None:
        docs = await DemoContent(daemon.pool).documents()
        if len(docs) < 3:
            self.say(TOO_FEW)
            return
        keep = {document_url(slug) for slug in (TEXT_EDIT_DOC, TITLE_EDIT_DOC, *QUERY_DOCS)}
        chosen: list[dict] = []
        for slug in (TEXT_EDIT_DOC, TITLE_EDIT_DOC, DELETE_DOC):
            # the corpus document, or, where an earlier run deleted it, one not chosen yet
            doc = next((d for d in docs if d["url"] == document_url(slug)), None)
            if doc is None or doc in chosen:
                doc = next((d for d in docs if d not in chosen and d["url"] not in keep), None)
            if doc is None:
                self.say(TOO_FEW)
                return
            chosen.append(doc)
        text_doc, title_doc, delete_doc = chosen

        self.say("   before the edits:")
        await self.search(daemon, client, EDIT_QUERY)
        points_before = await self.count_points(client)
        deleted_points_before = await self.count_points(client, delete_doc["id"])

        since = self.mark(daemon)  # before the writes: the running daemon applies them at once
        e = await self.write_edits(daemon, text_doc, title_doc, delete_doc)
        self.say()
        self.say(f"   1) UPDATE chunks     {e.text_title!r}, chunk {e.text_index}: {excerpt(e.text_before, 40)!r}")
        self.say(f"                        → {excerpt(e.text_after, 60)!r}")
        self.say(f"   2) UPDATE documents  title {e.title_before!r} → {e.title_after!r}")
        self.say(f"   3) DELETE documents  {e.deleted_title!r} and its {e.deleted_chunks} chunks (ON DELETE CASCADE)")

        seconds, stats = await self.drain(daemon, since, progress=False)
        self.say(f"   the daemon applied the {stats['events_acked']} events they queued  {_secs(seconds)}")
        self.say(f"     {stats['upserted']} point upserted with {stats['embedded']} new embedding: the edited text")
        self.say(f"     {stats['payload_only']} payloads updated, no embedding: the new title")
        self.say(f"     {stats['deleted']} points deleted: the deleted document's chunks")
        points_after = await self.count_points(client)
        deleted_points_after = await self.count_points(client, delete_doc["id"])
        retitled = await client.retrieve(
            self.settings.collection, [str(i) for i in e.retitled_chunks], with_payload=True
        )
        titles = sorted({str((p.payload or {}).get("title")) for p in retitled})
        self.say(f"   points in {self.settings.collection!r}: {points_before} → {points_after}; "
                 f"of the deleted document: {deleted_points_before} → {deleted_points_after}")
        self.say(f"   title in the payload of the retitled document's {len(retitled)} points: {', '.join(map(repr, titles))}")
        self.say()
        self.say("   after the edits:")
        await self.search(daemon, client, EDIT_QUERY, mark=e.text_chunk)

    async def write_edits(self, daemon, text_doc, title_doc, delete_doc) -> Edits:
        """Three transactions, as an application would write them."""
        e = Edits()
        content = DemoContent(daemon.pool)
        chunk = await content.retext_chunk(
            text_doc["id"], TEXT_EDIT_CHUNK, lambda text: EDIT_TEXTS[1] if text == EDIT_TEXTS[0] else EDIT_TEXTS[0]
        )
        e.text_chunk, e.text_title = chunk["id"], text_doc["title"]
        e.text_before, e.text_after, e.text_index = chunk["text"], chunk["new_text"], chunk["chunk_index"]
        before = title_doc["title"]
        after = before.removesuffix(TITLE_SUFFIX) if before.endswith(TITLE_SUFFIX) else before + TITLE_SUFFIX
        e.title_before, e.title_after = before, after
        e.retitled_chunks = await content.retitle_document(title_doc["id"], after)
        await content.delete_document(delete_doc["id"])
        e.deleted_title, e.deleted_chunks = delete_doc["title"], delete_doc["chunks"]
        return e

    # --- the end ---------------------------------------------------------------------------
    def hint(self, command: str) -> str:
        """`outboxd COMMAND` pointed at the demo's stores (a VARIABLE=value first where
        a setting has no flag on that command)."""
        env = [shlex.join(self.hint_env)] if self.hint_env else []
        return " ".join([*env, _prog(), command, shlex.join(self.hint_flags)])

    def next_steps(self) -> None:
        self.step(6, "What to try next")
        self.say(f"   The demo's data stays in {shown(self.demo_dir)}. Its PostgreSQL stops when the demo exits;")
        self.say("   any outboxd command given the same --data-dir starts it again.")
        self.say()
        self.say("   Keep the daemon running, and write to PostgreSQL from another terminal:")
        self.say(f"     {self.hint('run')}")
        self.say(f"     psql '{self.dsn}'")
        self.say("   (or any PostgreSQL client: that is the DATABASE_URL `outboxd run` prints, and it works while")
        self.say("   `outboxd run` runs), e.g.")
        self.say("     UPDATE chunks SET text = 'Vectors follow the rows.' WHERE id = (SELECT min(id::text)::uuid FROM chunks);")
        self.say()
        self.say("   Look, search and check (with `outboxd run` stopped: Qdrant's local mode opens in one process at a time):")
        self.say(f"     {self.hint('status')}")
        self.say(f"     {self.hint(SEARCH_HINT)}")
        self.say(f"     {self.hint('reconcile --check')}")
        self.say()
        self.say(f"   Start over: {_prog()} demo --fresh")

    def finish(self, still_up: int | None) -> None:
        elapsed = time.monotonic() - self.started
        self.say()
        if still_up is None:
            self.say(f"Done in {elapsed:.0f} s. Nothing is left running: PostgreSQL stopped, Qdrant closed.")
        else:
            self.say(f"Done in {elapsed:.0f} s. PostgreSQL (pid {still_up}) stays up for another process using it.")
