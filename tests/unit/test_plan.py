"""The one decision of what Qdrant must hold per chunk (daemon.core.plan), over
the whole grid of chunk states and points, with no services: what the apply
core does and what reconcile reports come from the same cell."""
from __future__ import annotations

import math
import uuid

import pytest

from daemon.core.chunk_state import ChunkState, Projection
from daemon.core.plan import AGREES, POINT_KEYS, Action, plan, same_value
from daemon.errors import InvalidChunkError

MODEL = Projection("model-a")
VERSION = "version"
GROUP = ("content_hash", "text_chars", "metadata_hash", "embedding_model", "token_count", "sparse", "truncated",
         VERSION)


def state(**overrides) -> ChunkState:
    values = dict(chunk_id=uuid.UUID(int=1), document_id=uuid.UUID(int=2), source_id=uuid.UUID(int=3), chunk_index=0,
                  text="Some chunk text.", token_count=3, content_hash="h1", metadata={"lang": "en"}, title="A title",
                  url=None, document_type=None, state_hash="s1")
    values.update(overrides)
    return ChunkState(**values)


def point_of(s: ChunkState, model: str = "model-a", *, deep: bool = False, sparse: str | None = None,
             **changes) -> dict:
    """What the apply core would have written for s, as reconcile or apply reads it back;
    changes to a bookkeeping key go inside the group."""
    payload = s.payload(Projection(model, sparse))
    payload["outboxd"]["truncated"] = False
    keys = payload if deep else {k: v for k, v in payload.items() if k in POINT_KEYS}
    group = {**keys.pop("outboxd"), **{k: v for k, v in changes.items() if k in GROUP}}
    return {**keys, **{k: v for k, v in changes.items() if k not in GROUP}, "outboxd": group}


def legacy_point(s: ChunkState) -> dict:
    """A point as an outboxd before the bookkeeping group wrote it: every key at the top."""
    point = point_of(s)
    return {**{k: v for k, v in point.items() if k != "outboxd"}, **point["outboxd"]}


CHUNKS = {
    "gone": None,
    "empty text": state(text=""),
    "blank text": state(text="  \n\t"),
    "text": state(),
}
POINTS = {
    "none": lambda s: None,
    "agrees": lambda s: point_of(s),
    "other model": lambda s: point_of(s, "model-b"),
    "other content": lambda s: point_of(s, content_hash="h0"),
    "other title": lambda s: point_of(s, title="An old title"),
    "other metadata": lambda s: point_of(s, metadata_hash="0" * 16),
    "no metadata_hash": lambda s: {**point_of(s), "outboxd": {
        k: v for k, v in point_of(s)["outboxd"].items() if k != "metadata_hash"}},
    "an earlier layout": legacy_point,
    "no sparse vector": lambda s: point_of(s),
    "another sparse vector": lambda s: point_of(s, sparse="bm25-other"),
    "deep, text edited": lambda s: point_of(s, deep=True, text="edited by hand"),
    "deep, metadata edited": lambda s: point_of(s, deep=True, metadata={"lang": "xx"}),
    "deep, agrees": lambda s: point_of(s, deep=True),
}
EXPECTED = {  # (chunk, point) -> (action, drift); "text" rows below, the others follow from "wants no point"
    ("text", "none"): (Action.UPSERT, "missing"),
    ("text", "agrees"): (Action.NOTHING, None),
    ("text", "other model"): (Action.UPSERT, "wrong_model"),
    ("text", "other content"): (Action.UPSERT, "stale"),
    ("text", "other title"): (Action.SET, "stale"),
    ("text", "other metadata"): (Action.SET, "stale"),
    ("text", "no metadata_hash"): (Action.SET, "stale"),
    ("text", "deep, text edited"): (Action.SET, "stale"),
    ("text", "deep, metadata edited"): (Action.SET, "stale"),
    ("text", "deep, agrees"): (Action.NOTHING, None),
    ("text", "an earlier layout"): (Action.REWRITE, "stale"),
    ("text", "no sparse vector"): (Action.NOTHING, None),  # none configured either
    ("text", "another sparse vector"): (Action.REWRITE, "wrong_sparse"),
}


@pytest.mark.parametrize("chunk", list(CHUNKS))
@pytest.mark.parametrize("point", list(POINTS))
def test_every_cell_of_the_grid(chunk, point):
    s = CHUNKS[chunk]
    p = POINTS[point](s if s is not None else state())
    got = plan(s, p, MODEL)
    if chunk == "text":
        assert (got.action, got.drift) == EXPECTED[(chunk, point)]
    else:  # gone or no text: the point must not exist
        assert (got.action, got.drift) == ((Action.NOTHING, None) if p is None else (Action.DELETE, "orphaned"))
    # what apply does and what reconcile reports never disagree
    assert (got.action is Action.NOTHING) == (got.drift is None)


def test_an_upsert_carries_the_whole_projection():
    s = state()
    got = plan(s, None, MODEL)
    assert got.payload == s.payload(MODEL)


def test_a_set_carries_only_what_differs():
    s = state(title="New title")
    assert plan(s, point_of(state()), MODEL).payload == {"title": "New title"}
    s = state(metadata={"lang": "de"})
    assert plan(s, point_of(state()), MODEL).payload == {
        "metadata": {"lang": "de"}, "outboxd": {"metadata_hash": s.payload(MODEL)["outboxd"]["metadata_hash"]}}
    edited = plan(state(), point_of(state(), deep=True, text="edited by hand"), MODEL).payload
    assert edited == {"text": "Some chunk text."}


@pytest.mark.parametrize("applied, version, action", [(7, 5, Action.OLDER), (5, 7, Action.SET), (None, 7, Action.SET)])
def test_a_point_of_a_newer_version_is_left_alone(applied, version, action):
    point = point_of(state(), **({VERSION: applied} if applied is not None else {}))
    got = plan(state(), point, MODEL, version)
    assert got.action is action
    if action is Action.SET:  # the content agrees: only the version moves on, so no older writer can land
        assert got.payload == {"outboxd": {VERSION: version}}


def test_a_versioned_payload_change_sets_the_keys_that_differ_and_the_version():
    got = plan(state(title="New title"), point_of(state(), **{VERSION: 3}), MODEL, 4)
    assert (got.action, got.payload) == (Action.SET, {"title": "New title", "outboxd": {VERSION: 4}})


def test_a_versioned_change_of_the_text_is_still_an_upsert_and_an_agreeing_one_nothing():
    s = state()
    assert plan(state(text="Other text.", content_hash="h2"), point_of(s, **{VERSION: 3}), MODEL, 4).action is Action.UPSERT
    assert plan(s, point_of(s, **{VERSION: 4}), MODEL, 4) is AGREES


@pytest.mark.parametrize("point, drift", [(None, "missing"), ("agrees", "stale")])
def test_a_chunk_no_point_can_be_made_of_is_rejected_by_name(point, drift):
    """The apply core fails that chunk alone with these words; reconcile reports the drift."""
    bad = state(metadata=[1, 2])
    got = plan(bad, point_of(state()) if point else None, MODEL)
    assert (got.action, got.drift) == (Action.REJECT, drift)
    assert "metadata" in got.error
    with pytest.raises(InvalidChunkError, match="metadata"):  # the same words as the projection's
        bad.payload(MODEL)


@pytest.mark.parametrize("deleted, version, action", [(7, 5, Action.OLDER), (5, 7, Action.UPSERT), (None, 5, Action.UPSERT)])
def test_an_upsert_older_than_a_delete_this_process_applied_is_left_alone(deleted, version, action):
    """The point is gone, so only the memory of the delete (Kafka) can tell the upsert is stale."""
    assert plan(state(), None, MODEL, version, deleted).action is action
    assert plan(state(), None, MODEL, None, deleted).action is Action.UPSERT  # unversioned targets ignore it


def ulps_up(x: float, n: int) -> float:
    for _ in range(n):
        x = math.nextafter(x, math.inf)
    return x


# (what the point holds, what was written, the same value?)
SAME_VALUE = {
    "one ulp apart (as a Qdrant server stores a float)": (0.9866863038386308, 0.9866863038386309, True),
    "three ulps apart at an extreme exponent": (ulps_up(-2.6692770531700445e178, 3), -2.6692770531700445e178, True),
    "a float and the int of its value": (3.0, 3, True),
    "twenty ulps apart (no store rounding goes that far)": (ulps_up(0.9866863038386309, 20), 0.9866863038386309, False),
    "really different floats": (0.9866863038386, 0.9866863038386309, False),
    "a float of another sign": (-0.5, 0.5, False),
    "a float and zero": (1e-300, 0.0, False),
    "true and 1": (True, 1, False),
    "1 and true": (1, True, False),
    "false and 0.0": (False, 0.0, False),
    "ints are exact": (2**53 + 1, 2**53, False),
    "a string of a number": ("1.5", 1.5, False),
    "none and a float": (None, 0.0, False),
    "nested, each float one ulp off": ({"a": [ulps_up(0.1, 1), {"b": ulps_up(7.25e-5, 1)}], "c": "x"},
                                       {"a": [0.1, {"b": 7.25e-5}], "c": "x"}, True),
    "nested, one float really different": ({"a": [0.1, {"b": 7.3e-5}]}, {"a": [0.1, {"b": 7.25e-5}]}, False),
    "nested, true for 1": ({"a": [1, {"b": True}]}, {"a": [1, {"b": 1}]}, False),
    "an extra key": ({"a": 0.5, "b": None}, {"a": 0.5}, False),
    "a missing key": ({"a": 0.5}, {"a": 0.5, "b": None}, False),
    "a shorter list": ([0.5], [0.5, 0.5], False),
    "a list for an object": ([0.5], {"0": 0.5}, False),
}


@pytest.mark.parametrize("case", list(SAME_VALUE))
def test_payload_values_are_equal_as_the_store_keeps_them(case):
    held, sent, same = SAME_VALUE[case]
    assert same_value(held, sent) is same


def test_a_deep_check_takes_floats_as_a_qdrant_server_keeps_them():
    """A server stores some floats a few ulps off what it was sent: no rewrite could
    change that, so it is no drift; a real edit of a float, or true for 1, still is."""
    s = state(metadata={"score": 0.9866863038386309, "spans": [{"w": 0.1}, {"w": 2.5e-7}], "seen": 1})
    kept = {"score": 0.9866863038386308, "spans": [{"w": ulps_up(0.1, 1)}, {"w": ulps_up(2.5e-7, 2)}], "seen": 1}
    assert plan(s, point_of(s, deep=True, metadata=kept), MODEL) is AGREES
    for edited in ({**kept, "score": 0.98}, {**kept, "seen": True}, {**kept, "spans": [{"w": 0.1}]}):
        got = plan(s, point_of(s, deep=True, metadata=edited), MODEL)
        assert (got.action, got.drift) == (Action.SET, "stale") and got.payload == {"metadata": s.metadata}


def test_the_sparse_vector_is_judged_like_the_dense_one():
    """A point without the configured sparse vector, or with one made otherwise, is
    written again whole with the vector it holds (nothing embedded); one that has a
    sparse vector where none is configured loses it the same way."""
    s = state()
    bm25 = Projection("model-a", sparse="bm25-1")
    for point, drift in ((point_of(s), "missing_sparse"), (point_of(s, sparse="bm25-2"), "wrong_sparse")):
        got = plan(s, point, bm25)
        assert (got.action, got.drift) == (Action.REWRITE, drift)
        assert got.payload == s.payload(bm25)
    assert plan(s, point_of(s, sparse="bm25-1"), bm25) is AGREES
    assert (plan(s, point_of(s, sparse="bm25-1"), MODEL).drift) == "wrong_sparse"
    assert plan(state(content_hash="h2"), point_of(s), bm25).action is Action.UPSERT  # new text: embedded


def test_a_point_of_an_earlier_layout_is_rewritten_and_its_version_still_counts():
    s = state()
    assert plan(s, legacy_point(s), MODEL).action is Action.REWRITE
    assert plan(s, {**legacy_point(s), VERSION: 9}, MODEL, 5).action is Action.OLDER
    assert plan(s, {**legacy_point(s), "embedding_model": "model-b"}, MODEL).action is Action.UPSERT


def test_a_new_text_length_in_the_payload_rewrites_the_text_without_embedding():
    """[payload] text_chars changed: the payload's text is set again (text_cut too where it flips)."""
    long = state(text="x" * 1500)
    got = plan(long, point_of(long), Projection("model-a", text_chars=0))
    assert got.action is Action.SET
    assert got.payload == {"text": "x" * 1500, "text_cut": False, "outboxd": {"text_chars": 0}}
