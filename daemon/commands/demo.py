"""`outboxd demo`: the whole pipeline on a fresh machine, with nothing configured.

It starts the embedded defaults in a folder of its own (`<data-dir>/demo`): a
real PostgreSQL from pgserver, Qdrant's local mode, the packaged MiniLM. It
loads the sample corpus that ships with outboxd (once), runs the daemon in
drain mode until the collection has converged, runs a few hybrid searches,
then edits a chunk's text, retitles a document and deletes another, and shows
the points following. Everything it starts has stopped when it exits.

It refuses to run against a configured DATABASE_URL or QDRANT_URL: it writes a
corpus, and a real database is no place for that.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import DEFAULT_MODEL
from daemon.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, OutboxdError

MARKER = ".outboxd-demo"  # written into the demo folder: --fresh wipes only a folder that has it

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

PROGRESS_QUERY = r"""
SELECT count(*) FILTER (WHERE c.text ~ '\S') AS chunks,
       count(*) FILTER (WHERE c.text ~ '\S' AND EXISTS (
           SELECT 1 FROM outboxd.outbox o WHERE o.chunk_id = c.id AND o.status = 'pending')) AS pending
FROM public.chunks c
"""


def register(sub, parents) -> None:
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="the whole pipeline on the embedded defaults with a sample corpus, in about a minute",
        description="Start the embedded PostgreSQL, Qdrant local mode and the packaged model in "
        "<data-dir>/demo, load a sample corpus, run the daemon until the collection has converged, "
        "run example hybrid searches, then change and delete some chunks and show the points "
        "following. Leaves nothing running. Refuses to run with DATABASE_URL or QDRANT_URL set.",
    )
    p.add_argument("--fresh", action="store_true", help="wipe the demo's folder first and start over")
    p.set_defaults(func=execute)


# --- helpers ------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path.resolve())


def _excerpt(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


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


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL serving pgdata, if one runs."""
    import psutil

    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if psutil.pid_exists(pid) else None


# --- the command --------------------------------------------------------------------------------
def execute(args, settings) -> int:
    configured = [
        name
        for name, value in (("DATABASE_URL", settings.database_url), ("QDRANT_URL", settings.qdrant_url))
        if value is not None
    ]
    if configured:
        names = " and ".join(configured)
        print(
            f"outboxd demo: {names} {'is' if len(configured) == 1 else 'are'} set (environment, .env or "
            "flag). The demo writes a sample corpus, so it runs only on its own embedded PostgreSQL and "
            f"Qdrant local mode, never on a configured server. Run it without {names}, e.g. "
            f"`env -u {' -u '.join(configured)} outboxd demo`.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    if "setting__log_level" not in vars(args) and "OUTBOXD_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)  # the demo tells its own story; logs only for trouble
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs, imported by pgserver

    demo_dir = settings.data_dir / "demo"
    problem = _prepare_dir(demo_dir, fresh=args.fresh)
    if problem:
        print(f"outboxd demo: {problem}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    demo_settings = settings.model_copy(
        update={
            "data_dir": demo_dir,
            "qdrant_path": demo_dir / "qdrant",
            # A drain ends when every worker saw nothing pending; a worker that found the
            # others' claims in flight looks again after this long.
            "poll_interval": min(settings.poll_interval, 0.2),
        }
    )
    demo = Demo(demo_settings, demo_dir, hint_flags=_hint_flags(settings, demo_dir))
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: close everything, stop PostgreSQL
    code = EXIT_FAILURE
    try:
        code = demo.run(fresh=args.fresh)
    except asyncio.CancelledError:  # interrupted in the async part, which then closed what it opened
        raise KeyboardInterrupt from None
    finally:
        still_up = demo.stop_postgres()
    if code == EXIT_OK:
        demo.finish(still_up)
    return code


def _interrupt(signum, frame) -> None:
    """SIGTERM outside the event loop; inside it, pipeline() turns it into a cancellation."""
    raise KeyboardInterrupt


def _hint_flags(settings, demo_dir: Path) -> list[str]:
    """The flags that point another outboxd command at the demo's stores."""
    flags = ["--data-dir", _shown(demo_dir)]
    if settings.qdrant_path is not None:  # OUTBOXD_QDRANT_PATH would send it elsewhere
        flags += ["--qdrant-path", _shown(demo_dir / "qdrant")]
    if settings.collection != "chunks":
        flags += ["--collection", settings.collection]
    if settings.model != DEFAULT_MODEL:
        flags += ["--model", settings.model]
    return flags


def _prepare_dir(demo_dir: Path, *, fresh: bool) -> str | None:
    """Create the demo folder (wiping it first with --fresh). A reason it cannot, or None."""
    if fresh and demo_dir.exists():
        if any(demo_dir.iterdir()) and not (demo_dir / MARKER).exists():
            return f"--fresh would delete {demo_dir}, which the demo did not create; remove it yourself"
        pid = _postmaster_pid(demo_dir / "postgres")
        if pid is not None:
            return (
                f"the demo's PostgreSQL is running (pid {pid}), probably for an `outboxd run --data-dir "
                f"{_shown(demo_dir)}`; stop that first, then run `outboxd demo --fresh` again"
            )
        shutil.rmtree(demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / MARKER).write_text("created by `outboxd demo`; `outboxd demo --fresh` deletes this folder\n")
    return None


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
    deleted_doc: Any = None
    deleted_title: str = ""
    deleted_chunks: int = 0


class Demo:
    def __init__(self, settings, demo_dir: Path, *, hint_flags: list[str]) -> None:
        from rich.console import Console

        self.settings = settings
        self.demo_dir = demo_dir
        self.hint_flags = hint_flags
        # Piped (a CI log, a README), tables get a fixed, readable width.
        self.console = Console(width=None if sys.stdout.isatty() else 100, highlight=False)
        self.dsn: str | None = None

    def say(self, text: str = "") -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def step(self, n: int, title: str) -> None:
        from rich.text import Text

        self.console.print()
        self.console.print(Text(f"{n}. {title}", style="bold"), soft_wrap=True)

    # --- the sync part: PostgreSQL and the corpus -----------------------------------------------
    def run(self, *, fresh: bool) -> int:
        from db import migrate
        from db.embedded import start_embedded_postgres

        self.say(f"outboxd demo: everything runs embedded, in {_shown(self.demo_dir)}")
        self.say("(wiped by --fresh)" if fresh else "(`outboxd demo --fresh` wipes it and starts over)")

        self.step(1, "PostgreSQL")
        t = time.perf_counter()
        self.dsn = start_embedded_postgres(self.demo_dir.resolve())
        migrate.upgrade(self.dsn)
        self.say(
            f"   PostgreSQL 16 from the pgserver wheel, in {_shown(self.demo_dir / 'postgres')}: "
            f"up, schema migrated  {_secs(time.perf_counter() - t)}"
        )

        self.step(2, "A sample corpus, written the way an application writes")
        self.load_corpus()
        try:
            return asyncio.run(self.pipeline())
        finally:
            signal.signal(signal.SIGTERM, _interrupt)  # closing the loop reset it

    def load_corpus(self) -> None:
        import psycopg

        from daemon.corpus import load_corpus

        t = time.perf_counter()
        with psycopg.connect(self.dsn, autocommit=True, application_name="outboxd:demo") as conn:
            loaded = conn.execute("SELECT count(*) FROM public.documents").fetchone()[0] == 0
            if loaded:
                load_corpus(conn)  # one transaction
            documents, chunks, pending = conn.execute(
                "SELECT (SELECT count(*) FROM public.documents), (SELECT count(*) FROM public.chunks), "
                "(SELECT count(*) FROM outboxd.outbox WHERE status = 'pending')"
            ).fetchone()
        if loaded:
            self.say(f"   {documents} documents, {chunks} chunks inserted in one transaction  {_secs(time.perf_counter() - t)}")
            self.say(f"   the capture triggers queued {pending} outbox events in that same transaction")
        else:
            self.say(f"   loaded by an earlier run: {documents} documents, {chunks} chunks; {pending} outbox events pending")

    # --- the async part: the daemon, searches, edits ---------------------------------------------
    async def pipeline(self) -> int:
        from qdrant_client import AsyncQdrantClient

        from daemon.outbox.notify_daemon import Daemon

        # Ctrl-C (asyncio.run's own handler) and SIGTERM cancel this task: the
        # daemon then finishes its batches in flight and everything is closed.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        qdrant_path = self.settings.local_qdrant_path
        try:
            # One client for the daemon and the searches: local mode allows one per folder.
            client = AsyncQdrantClient(path=qdrant_path)
        except RuntimeError as exc:
            if "already accessed" not in str(exc):
                raise
            print(
                f"outboxd demo: {qdrant_path} is open in another process (an `outboxd run "
                f"{shlex.join(self.hint_flags)}`?); Qdrant's local mode allows one process at a time: stop it first.",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        daemon = Daemon(self.settings, self.dsn, qdrant=client)
        try:
            self.step(3, "The daemon: claim, embed, upsert, acknowledge")
            t = time.perf_counter()
            await daemon.start()
            self.say(f"   model {daemon.embedding.embedder.fingerprint} loaded  {_secs(time.perf_counter() - t)}")
            self.say(
                f"   Qdrant local mode in {_shown(Path(qdrant_path))}: "
                f"alias {self.settings.collection!r} → collection {daemon.core.qdrant_store.collection!r}"
            )
            await self.converge(daemon, client)

            self.step(4, "Hybrid search: Qdrant's vector similarity + PostgreSQL's full text, fused")
            self.say("   (vec, kw: the hit's rank among each side's candidates; — : not among them)")
            for q in QUERIES:
                await self.search(daemon, client, q)

            self.step(5, "Changes follow: edit a chunk, retitle a document, delete a document")
            await self.edit_and_follow(daemon, client)
        finally:
            await daemon.close()  # its pool and the model; the client is ours
            await client.close()
        self.next_steps()
        return EXIT_OK

    async def count_points(self, client, document_id=None) -> int:
        from qdrant_client import models

        flt = None
        if document_id is not None:
            flt = models.Filter(
                must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=str(document_id)))]
            )
        return (await client.count(self.settings.collection, count_filter=flt, exact=True)).count

    async def _progress(self, daemon) -> tuple[int, int]:
        """(chunks with text, those of them with no event pending)."""
        async with daemon.pool.connection() as conn:
            row = await (await conn.execute(PROGRESS_QUERY)).fetchone()
        return row["chunks"], row["chunks"] - row["pending"]

    async def drain(self, daemon, *, progress: bool) -> tuple[float, dict[str, int]]:
        """Run the daemon until nothing is pending: with a progress bar of converged
        chunks on a terminal, a line every few seconds elsewhere. Returns the
        seconds it took and the daemon's counters for this run."""
        before = asdict(daemon.stats)
        t = time.perf_counter()
        task = asyncio.create_task(daemon.run(drain=True), name="demo-drain")
        try:
            if progress and self.console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                total, done = await self._progress(daemon)
                with Progress(
                    TextColumn("   converging"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("chunks"),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                ) as bar:
                    job = bar.add_task("converging", total=total, completed=done)
                    while not task.done():
                        await asyncio.wait({task}, timeout=0.25)
                        total, done = await self._progress(daemon)
                        bar.update(job, total=total, completed=done)
            elif progress:
                last = None
                while not task.done():
                    await asyncio.wait({task}, timeout=5.0)
                    if not task.done() and (now := await self._progress(daemon)) != last:
                        self.say(f"   converging: {now[1]}/{now[0]} chunks  {time.perf_counter() - t:.0f} s")
                        last = now
            code = await asyncio.shield(task)
        except asyncio.CancelledError:  # Ctrl-C or SIGTERM: finish the batches in flight, like `outboxd run`
            daemon.stop.set()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if code != 0:
            raise OutboxdError(f"the daemon stopped with exit code {code}; the log above says why")
        after = asdict(daemon.stats)
        return time.perf_counter() - t, {k: after[k] - before[k] for k in after}

    async def converge(self, daemon, client) -> None:
        seconds, stats = await self.drain(daemon, progress=True)
        total, _ = await self._progress(daemon)
        points = await self.count_points(client)
        self.say(f"   converged: {points} points for {total} chunks with text  {_secs(seconds)}")
        self.say(
            f"   ({stats['embedded']} texts embedded, {stats['events_acked']} events acknowledged"
            f" in {stats['batches']} batches)"
        )
        if stats["dead_letters"]:
            self.say(f"   {stats['dead_letters']} events became dead letters: `outboxd dead-letters list` shows why")

    async def search(self, daemon, client, query: str, *, limit: int = 3, mark=None) -> list:
        from rich.text import Text

        from daemon.hybrid_search import hybrid_search

        t = time.perf_counter()
        hits = await hybrid_search(daemon.pool, client, self.settings.collection, daemon.embedding.embedder, query, limit=limit)
        ms = (time.perf_counter() - t) * 1000
        self.say()
        self.say(f'   "{query}"  {ms:.0f} ms')
        if not hits:
            self.say("   (no hits)")
            return hits
        rows = [
            (
                str(rank),
                f"{h.score:.3f}",
                "—" if h.vector_rank is None else str(h.vector_rank),
                "—" if h.keyword_rank is None else str(h.keyword_rank),
                _excerpt(h.title or "", 34),
                ("(edited) " if mark is not None and str(h.chunk_id) == str(mark) else "") + h.text,
            )
            for rank, h in enumerate(hits, 1)
        ]
        title_w = max(len("title"), *(len(r[4]) for r in rows))
        excerpt_w = max(30, self.console.width - 25 - title_w)

        def line(n, score, vec, kw, title, excerpt):
            return f"   {n:>2} {score:>6} {vec:>4} {kw:>3}  {title:<{title_w}}  {_excerpt(excerpt, excerpt_w)}"

        self.console.print(Text(line("#", "score", "vec", "kw", "title", "excerpt"), style="dim"), soft_wrap=True)
        for r in rows:
            self.say(line(*r))
        return hits

    # --- the edits -----------------------------------------------------------------------
    async def edit_and_follow(self, daemon, client) -> None:
        from daemon.corpus import document_url

        async with daemon.pool.connection() as conn:
            docs = await (
                await conn.execute(
                    "SELECT d.id, d.title, d.url, count(c.id) AS chunks FROM public.documents d "
                    "JOIN public.chunks c ON c.document_id = d.id AND c.text ~ '\\S' "
                    "GROUP BY d.id ORDER BY d.title DESC, d.id"
                )
            ).fetchall()
        if len(docs) < 3:
            self.say("   too few documents are left from earlier runs to edit; `outboxd demo --fresh` starts over")
            return
        keep = {document_url(slug) for slug in (TEXT_EDIT_DOC, TITLE_EDIT_DOC, *QUERY_DOCS)}
        chosen: list[dict] = []
        for slug in (TEXT_EDIT_DOC, TITLE_EDIT_DOC, DELETE_DOC):
            # the corpus document, or, where an earlier run deleted it, one not chosen yet
            doc = next((d for d in docs if d["url"] == document_url(slug)), None)
            if doc is None or doc in chosen:
                doc = next((d for d in docs if d not in chosen and d["url"] not in keep), None)
            if doc is None:
                self.say("   too few documents are left from earlier runs to edit; `outboxd demo --fresh` starts over")
                return
            chosen.append(doc)
        text_doc, title_doc, delete_doc = chosen

        self.say("   before the edits:")
        await self.search(daemon, client, EDIT_QUERY)
        points_before = await self.count_points(client)
        deleted_points_before = await self.count_points(client, delete_doc["id"])

        e = await self.write_edits(daemon, text_doc, title_doc, delete_doc)
        self.say()
        self.say(f"   1) UPDATE chunks     {e.text_title!r}, chunk {e.text_index}: {_excerpt(e.text_before, 40)!r}")
        self.say(f"                        → {_excerpt(e.text_after, 60)!r}")
        self.say(f"   2) UPDATE documents  title {e.title_before!r} → {e.title_after!r}")
        self.say(f"   3) DELETE documents  {e.deleted_title!r} and its {e.deleted_chunks} chunks (ON DELETE CASCADE)")

        seconds, stats = await self.drain(daemon, progress=False)
        self.say(f"   the daemon applied the {stats['events_acked']} events they queued  {_secs(seconds)}")
        self.say(
            f"     {stats['upserted']} point upserted with {stats['embedded']} new embedding: the edited text"
        )
        self.say(f"     {stats['payload_only']} payloads updated, no embedding: the new title")
        self.say(f"     {stats['deleted']} points deleted: the deleted document's chunks")
        points_after = await self.count_points(client)
        deleted_points_after = await self.count_points(client, delete_doc["id"])
        retitled = await client.retrieve(
            self.settings.collection, [str(i) for i in e.retitled_chunks], with_payload=True
        )
        titles = sorted({str((p.payload or {}).get("title")) for p in retitled})
        self.say(
            f"   points in {self.settings.collection!r}: {points_before} → {points_after}; "
            f"of the deleted document: {deleted_points_before} → {deleted_points_after}"
        )
        self.say(f"   title in the payload of the retitled document's {len(retitled)} points: {', '.join(map(repr, titles))}")
        self.say()
        self.say("   after the edits:")
        await self.search(daemon, client, EDIT_QUERY, mark=e.text_chunk)

    async def write_edits(self, daemon, text_doc, title_doc, delete_doc) -> Edits:
        """Three transactions, as an application would write them."""
        e = Edits()
        async with daemon.pool.connection() as conn:
            async with conn.transaction():
                chunk = await (
                    await conn.execute(
                        "SELECT id, chunk_index, text FROM public.chunks WHERE document_id = %s "
                        "ORDER BY chunk_index = %s DESC, chunk_index LIMIT 1",
                        (text_doc["id"], TEXT_EDIT_CHUNK),
                    )
                ).fetchone()
                text = EDIT_TEXTS[1] if chunk["text"] == EDIT_TEXTS[0] else EDIT_TEXTS[0]
                await conn.execute("UPDATE public.chunks SET text = %s WHERE id = %s", (text, chunk["id"]))
                e.text_chunk, e.text_title = chunk["id"], text_doc["title"]
                e.text_before, e.text_after, e.text_index = chunk["text"], text, chunk["chunk_index"]
            async with conn.transaction():
                before = title_doc["title"]
                after = before.removesuffix(TITLE_SUFFIX) if before.endswith(TITLE_SUFFIX) else before + TITLE_SUFFIX
                await conn.execute("UPDATE public.documents SET title = %s WHERE id = %s", (after, title_doc["id"]))
                rows = await (
                    await conn.execute(
                        "SELECT id FROM public.chunks WHERE document_id = %s AND text ~ '\\S' ORDER BY chunk_index",
                        (title_doc["id"],),
                    )
                ).fetchall()
                e.title_before, e.title_after, e.retitled_chunks = before, after, [r["id"] for r in rows]
            async with conn.transaction():
                await conn.execute("DELETE FROM public.documents WHERE id = %s", (delete_doc["id"],))
                e.deleted_doc, e.deleted_title, e.deleted_chunks = delete_doc["id"], delete_doc["title"], delete_doc["chunks"]
        return e

    # --- the end ---------------------------------------------------------------------------
    def next_steps(self) -> None:
        prog, flags = _prog(), shlex.join(self.hint_flags)
        self.step(6, "What to try next")
        self.say(f"   The demo's data stays in {_shown(self.demo_dir)}. Its PostgreSQL stops when the demo exits;")
        self.say("   any outboxd command given the same --data-dir starts it again.")
        self.say()
        self.say("   Keep the daemon running, and write to PostgreSQL from another terminal:")
        self.say(f"     {prog} run {flags}")
        self.say(f"     psql '{self.dsn}'")
        self.say("   (or any PostgreSQL client: that is the DATABASE_URL `outboxd run` prints, and it works while")
        self.say("   `outboxd run` runs), e.g.")
        self.say("     UPDATE chunks SET text = 'Vectors follow the rows.' WHERE id = (SELECT min(id::text)::uuid FROM chunks);")
        self.say()
        self.say("   Look, search and check (with `outboxd run` stopped: Qdrant's local mode opens in one process at a time):")
        self.say(f"     {prog} status {flags}")
        self.say(f'     {prog} search "how do I season a pan?" {flags}')
        self.say(f"     {prog} reconcile --check {flags}")
        self.say()
        self.say(f"   Start over: {prog} demo --fresh")

    def stop_postgres(self) -> int | None:
        """Let go of the embedded PostgreSQL now: pgserver stops it when the last
        handle closes. Returns its pid if it is still up (another process, e.g. an
        `outboxd run` on the same folder, holds a handle), else None."""
        if self.dsn is None:  # never started
            return None
        import pgserver

        pgdata = (self.demo_dir / "postgres").resolve()
        pgserver.get_server(pgdata, cleanup_mode="stop").cleanup()
        return _postmaster_pid(pgdata)

    def finish(self, still_up: int | None) -> None:
        import psutil

        elapsed = time.time() - psutil.Process().create_time()  # the whole command, imports included
        self.say()
        if still_up is None:
            self.say(f"Done in {elapsed:.0f} s. Nothing is left running: PostgreSQL stopped, Qdrant closed.")
        else:
            self.say(f"Done in {elapsed:.0f} s. PostgreSQL (pid {still_up}) stays up for another process using it.")
