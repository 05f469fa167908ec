"""Hybrid search's pure parts: normalisation, weighted and reciprocal rank
fusion, and the filters' translation to Qdrant and SQL parameters."""
from __future__ import annotations

import uuid

import pytest
from qdrant_client import models

from daemon.commands.search import FUSIONS as CLI_FUSIONS
from daemon.commands.search import excerpt, parse_metadata, query_settings
from daemon.config import Settings
from daemon.hybrid_search import FUSIONS, RRF_K, SearchFilters, fuse, normalise, rrf_fusion, weighted_fusion


def test_normalise_min_max():
    """Best becomes 1, worst 0, the rest in proportion; order is kept."""
    assert normalise([0.9, 0.5, 0.1]) == pytest.approx([1.0, 0.5, 0.0])
    assert normalise([2.0, 4.0]) == [0.0, 1.0]


def test_normalise_single_equal_and_empty():
    """A single element is 1.0; all-equal scores are all 1.0 (each is the best); empty stays empty."""
    assert normalise([0.37]) == [1.0]
    assert normalise([0.2, 0.2, 0.2]) == [1.0, 1.0, 1.0]
    assert normalise([]) == []


def test_weighted_fusion_scores_and_ranks():
    """score = w * normalised vector + (1 - w) * normalised keyword; absent counts 0; ranks are 1-based."""
    vector = [("a", 0.9), ("b", 0.7), ("c", 0.5)]
    keyword = [("c", 0.3), ("d", 0.1)]
    fused = {f.id: f for f in weighted_fusion(vector, keyword, 0.7)}
    assert fused["a"].score == pytest.approx(0.7)            # vector 1.0, keyword absent
    assert fused["b"].score == pytest.approx(0.7 * 0.5)      # vector 0.5
    assert fused["c"].score == pytest.approx(0.3)            # vector 0.0, keyword 1.0
    assert fused["d"].score == pytest.approx(0.0)            # keyword 0.0
    assert (fused["c"].vector_rank, fused["c"].keyword_rank) == (3, 1)
    assert (fused["a"].vector_rank, fused["a"].keyword_rank) == (1, None)
    assert (fused["d"].vector_rank, fused["d"].keyword_rank) == (None, 2)
    assert [f.id for f in weighted_fusion(vector, keyword, 0.7)] == ["a", "b", "c", "d"]


def test_weighted_fusion_a_match_in_both_lists_wins():
    """A chunk second in both lists beats one that is first in only one of them."""
    vector = [("v", 0.8), ("both", 0.79), ("x", 0.2)]
    keyword = [("k", 0.5), ("both", 0.45), ("y", 0.1)]
    assert weighted_fusion(vector, keyword)[0].id == "both"


def test_weighted_fusion_single_keyword_hit_normalises_to_one():
    """A keyword list of one element counts fully: (1 - w) * 1.0."""
    fused = weighted_fusion([], [("k", 0.01)], 0.7)
    assert [(f.id, f.score, f.vector_rank, f.keyword_rank) for f in fused] == [("k", pytest.approx(0.3), None, 1)]


def test_weighted_fusion_extreme_weights():
    """w = 1 is pure vector order, w = 0 pure keyword order."""
    vector = [("a", 0.9), ("b", 0.5)]
    keyword = [("b", 2.0), ("a", 1.0)]
    assert [f.id for f in weighted_fusion(vector, keyword, 1.0)] == ["a", "b"]
    assert [f.id for f in weighted_fusion(vector, keyword, 0.0)] == ["b", "a"]


@pytest.mark.parametrize("w", [-0.1, 1.5])
def test_weighted_fusion_rejects_a_weight_outside_0_1(w):
    """The vector weight is a share: between 0 and 1."""
    with pytest.raises(ValueError, match="between 0 and 1"):
        weighted_fusion([("a", 1.0)], [], w)


def test_rrf_sums_reciprocal_ranks():
    """RRF: sum of 1 / (60 + rank) over the lists an id is in; scores are ignored."""
    fused = {f.id: f for f in rrf_fusion(["a", "b", "c"], ["c", "a"])}
    assert RRF_K == 60
    assert fused["a"].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"].score == pytest.approx(1 / 62)
    assert fused["c"].score == pytest.approx(1 / 63 + 1 / 61)
    assert [f.id for f in rrf_fusion(["a", "b", "c"], ["c", "a"])] == ["a", "c", "b"]
    assert (fused["b"].vector_rank, fused["b"].keyword_rank) == (2, None)


def test_rrf_ties_go_to_the_better_rank_deterministically():
    """Equal fused scores are ordered by the better single rank, then id: the same input gives the same output."""
    fused = rrf_fusion(["v1", "v2"], ["k1", "k2"])
    assert [f.id for f in fused][:2] == ["k1", "v1"]  # both 1/61, rank 1 each, then by id
    assert [f.id for f in fused] == [f.id for f in rrf_fusion(["v1", "v2"], ["k1", "k2"])]


def test_duplicates_in_a_list_keep_their_best_rank():
    """An id listed twice (it should not be) counts once, at its first position."""
    fused = {f.id: f for f in rrf_fusion(["a", "a", "b"], [])}
    assert fused["a"].score == pytest.approx(1 / 61) and fused["b"].vector_rank == 3
    assert len(weighted_fusion([("a", 1.0), ("a", 0.1), ("b", 0.5)], [])) == 2


def test_fuse_dispatches_and_rejects_unknown_methods():
    """fuse() picks the method by name; an unknown name is a ValueError."""
    vector, keyword = [("a", 0.9), ("b", 0.1)], [("b", 1.0)]
    assert fuse(vector, keyword, fusion="rrf") == rrf_fusion(["a", "b"], ["b"])
    assert fuse(vector, keyword, fusion="weighted", vector_weight=0.5) == weighted_fusion(vector, keyword, 0.5)
    assert fuse([], [], fusion="rrf") == []
    for name in ("borda", "dbsf"):  # dbsf is Qdrant's own, fused in the server
        with pytest.raises(ValueError, match="not one fused here: use one of weighted, rrf"):
            fuse(vector, keyword, fusion=name)


# --- filters -------------------------------------------------------------------------------
def test_filters_to_qdrant_and_sql():
    """Each filter is a payload condition in Qdrant and a parameter of the SQL; numbers match as ranges."""
    src, doc = uuid.uuid4(), uuid.uuid4()
    f = SearchFilters(source_id=src, document_id=doc, document_type="guide",
                      metadata={"topic": "cooking", "paragraph": 2, "lang.code": "en", "draft": False})
    conditions = {c.key: c for c in f.qdrant_filter().must}
    assert conditions["source_id"].match == models.MatchValue(value=str(src))
    assert conditions["document_id"].match == models.MatchValue(value=str(doc))
    assert conditions["document_type"].match == models.MatchValue(value="guide")
    assert conditions["metadata.topic"].match == models.MatchValue(value="cooking")
    assert conditions["metadata.paragraph"].range == models.Range(gte=2, lte=2)
    assert conditions["metadata.lang.code"].match == models.MatchValue(value="en")
    assert conditions["metadata.draft"].match == models.MatchValue(value=False)
    restriction = f.restriction()
    assert (restriction["source_id"], restriction["document_id"], restriction["document_type"]) == (src, doc, "guide")
    assert restriction["metadata"] == {"topic": "cooking", "paragraph": 2, "lang": {"code": "en"}, "draft": False}


def test_no_filters_means_none():
    """Without filters there is no Qdrant filter and every SQL filter parameter is NULL."""
    assert SearchFilters().qdrant_filter() is None
    assert set(SearchFilters().restriction().values()) == {None}


@pytest.mark.parametrize("metadata", [{"": "x"}, {"a..b": 1}, {"k": None}, {"k": [1]}, {"k": {"x": 1}},
                                      {"a": 1, "a.b": 2}, {"k": float("nan")}])
def test_bad_metadata_filters_are_refused(metadata):
    """Empty keys, non-scalar values and contradictory paths are ValueErrors, not silent no-matches."""
    with pytest.raises(ValueError):
        SearchFilters(metadata=metadata)


def test_cli_metadata_values_and_excerpt():
    """--metadata KEY=VALUE reads JSON scalars, else text; the excerpt is one line of at most 100 chars."""
    assert parse_metadata("paragraph=2") == ("paragraph", 2)
    assert parse_metadata("draft=true") == ("draft", True)
    assert parse_metadata('code="2"') == ("code", "2")
    assert parse_metadata("topic=cooking") == ("topic", "cooking")
    assert parse_metadata("url=a=b") == ("url", "a=b")
    assert CLI_FUSIONS == tuple(FUSIONS)  # the command's --fusion choices, kept light for --help
    assert excerpt("short\n text") == "short text"
    long = excerpt("word " * 60)
    assert len(long) == 100 and long.endswith("…")


def test_a_search_loads_its_model_on_the_cpu_in_fp32_unless_a_device_is_named(monkeypatch):
    """One query is milliseconds on a CPU; starting CUDA for it costs seconds, and a
    lower precision is checked against fp32 on a sample first. ONNX keeps its own
    settings: int8 is another fingerprint."""
    for name in ("OUTBOXD_DEVICE", "OUTBOXD_EMBEDDING__DEVICE", "OUTBOXD_EMBEDDING__PRECISION",
                 "OUTBOXD_EMBEDDING__BACKEND"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(database_url=None)
    assert settings.embedding.device is None and query_settings(settings).embedding.device == "cpu"
    assert query_settings(settings).embedding.name == settings.embedding.name
    assert query_settings(settings).embedding.precision == "fp32"
    named = query_settings(Settings(database_url=None, embedding={"backend": "sentence-transformers",
                                                                  "device": "cuda:1", "precision": "fp16"}))
    assert named.embedding.device == "cuda:1" and named.embedding.precision == "fp32"
    onnx = Settings(database_url=None, embedding={"backend": "onnx", "quantize": True})
    assert query_settings(onnx).embedding == onnx.embedding.model_copy(update={"device": "cpu"})
