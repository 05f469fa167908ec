"""What Qdrant must hold for one chunk, decided in one place.

`plan(state, point, projection)` compares a chunk's current state with what its
point holds now and says what converges it, and what kind of drift the
difference is. The apply core carries the plan out; reconcile (and anything
else that judges a collection) reports its drift. Both read the same keys of
the point (POINT_KEYS), so they can never disagree about the same point.

    chunk                   point                      action   drift
    gone, or no text        none                       nothing  -
    gone, or no text        exists                     delete   orphaned
    has text                none                       upsert   missing
    has text                of another model           upsert   wrong_model
    has text                other content_hash         upsert   stale
    has text                laid out by an earlier     rewrite  stale
                              outboxd (no bookkeeping
                              group)
    has text                no sparse vector, or one   rewrite  missing_sparse /
                              made otherwise                      wrong_sparse
    has text                payload keys differ        set      stale
    has text                all keys agree             nothing  -
    invalid (no point can   none / exists              reject   missing / stale
      be made of it)

A chunk no point can be made of (metadata that is not a JSON object, ...) is
rejected with the projection's words: the apply core fails that chunk alone
(its events retry, then become dead letters), reconcile reports the drift.

A versioned target (every target carries its chunk's version) whose point
already reflects a newer version, or that is older than a delete this process
applied (the point is gone, so only the process's memory of that delete can
tell), is left alone (`older`); the payload a versioned plan writes carries
the version (a set includes it among the keys it sets). A rewrite writes the
point again whole with the dense vector it holds (its text is unchanged, so
nothing is embedded): the sparse vector is the server's to compute again, and a
whole write is the only one that drops the keys of an earlier layout. Bulky
keys are judged by the keys that stand for them: text by content_hash and the
text_chars it was cut to, metadata by metadata_hash; where the point holds the
bulky key itself (a deep check reads it), its value is compared too. Keys
inside the bookkeeping group are compared one by one, and a set names only
those that differ, so the point keeps `truncated` (the embedding's). Values are
compared as the store keeps them (same_value): a float within FLOAT_REL_TOL of
the one sent is the same float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from daemon.core.chunk_state import BOOKKEEPING, METADATA_HASH, PROVENANCE, SPARSE, VERSION, ChunkState, Projection
from daemon.errors import InvalidChunkError

# the payload path of the event version a point reflects (Qdrant's filters and conditions name it)
VERSION_KEY = f"{BOOKKEEPING}.{VERSION}"
# bulky key -> the bookkeeping keys that stand for it (equal content hash and cut, equal text; ...)
BULK_KEYS = {"text": ("content_hash", "text_chars"), "metadata": (METADATA_HASH,)}
# top-level keys of a point laid out before the bookkeeping group existed, read to tell it
LEGACY_KEYS = ["content_hash", "embedding_model", VERSION]
# what is read of a point to plan it: enough to tell what changed, never its bulk
POINT_KEYS = ["text_cut", *PROVENANCE, BOOKKEEPING, *LEGACY_KEYS]
# A Qdrant server stores payload floats through a JSON float parser that is not correctly
# rounded (REST and gRPC alike): about one in nine comes back 1 ulp off, a few 2 or 3 ulps
# at extreme exponents (relative error measured up to 5.5e-16). No rewrite can change that,
# so floats this close are the same value; twice the worst case, far below any real edit.
FLOAT_REL_TOL = 1e-15


class Action(str, Enum):
    NOTHING = "nothing"
    DELETE = "delete"
    UPSERT = "upsert"  # embed (or reuse a vector) and write the whole point
    SET = "set"  # set these payload keys; the vector stays
    REWRITE = "rewrite"  # write the whole point again with the dense vector it holds (the text is unchanged)
    OLDER = "older"  # the point reflects a newer version than this target
    REJECT = "reject"  # no point can be made of this chunk (`error` says why)


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    drift: str | None = None  # missing, orphaned, stale, wrong_model, missing_sparse, wrong_sparse; None: agrees
    payload: dict[str, Any] | None = None  # UPSERT, REWRITE: the whole payload; SET: the keys to set
    error: str | None = None  # REJECT: what is wrong with the chunk (names the field and the limit)


AGREES = Plan(Action.NOTHING)
OLDER = Plan(Action.OLDER)


def wants_no_point(state: ChunkState | None) -> bool:
    """Gone, or no text worth embedding: the chunk's point must not exist."""
    return state is None or not state.has_text


def bookkeeping(point: dict[str, Any]) -> dict[str, Any]:
    """A point's bookkeeping keys: its group, or the top level of a point laid out before it."""
    group = point.get(BOOKKEEPING)
    return group if isinstance(group, dict) else point


def plan(state: ChunkState | None, point: dict[str, Any] | None, projection: Projection, version: int | None = None,
         deleted: int | None = None) -> Plan:
    """The plan for one chunk. point: the point's payload (POINT_KEYS at least),
    None where there is no point. version: the target's event version;
    deleted: the version of a delete of this chunk that this process applied."""
    if version is not None:
        applied = bookkeeping(point).get(VERSION) if point is not None else None
        if (isinstance(applied, int) and applied > version) or (deleted is not None and deleted > version):
            return OLDER
    if wants_no_point(state):
        return Plan(Action.DELETE, "orphaned") if point is not None else AGREES
    try:
        payload = state.payload(projection)
    except InvalidChunkError as exc:
        return Plan(Action.REJECT, "missing" if point is None else "stale", error=str(exc))
    if version is not None:
        payload[BOOKKEEPING][VERSION] = version
    if point is None:
        return Plan(Action.UPSERT, "missing", payload)
    held = bookkeeping(point)
    if held.get("embedding_model") != projection.model_id:
        return Plan(Action.UPSERT, "wrong_model", payload)
    if held.get("content_hash") != state.content_hash:
        return Plan(Action.UPSERT, "stale", payload)
    if held is point:
        return Plan(Action.REWRITE, "stale", payload)
    if held.get(SPARSE) != projection.sparse:
        drift = "missing_sparse" if projection.sparse is not None and held.get(SPARSE) is None else "wrong_sparse"
        return Plan(Action.REWRITE, drift, payload)
    changed = changed_keys(point, payload)
    if not changed:
        return AGREES
    return Plan(Action.SET, "stale", changed)


def changed_keys(point: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The payload keys to set: those that differ, a bulky one judged by the keys
    that stand for it (and by its own value where the point holds it), the
    bookkeeping group's key by key. Set, not overwrite: "truncated" belongs to
    the vector and stays, and one title or metadata change is then the same
    update for every chunk. A point without metadata_hash (marked by a reconcile
    repair) gets its whole payload."""
    held = bookkeeping(point)
    if METADATA_HASH not in held:
        return dict(payload)
    wanted = payload[BOOKKEEPING]
    changed: dict[str, Any] = {}
    for key, value in payload.items():
        if key == BOOKKEEPING:
            group = {k: v for k, v in value.items() if k not in held or not same_value(held[k], v)}
            if group:
                changed[key] = group
            continue
        stand_ins = BULK_KEYS.get(key)
        if stand_ins is None:
            differs = not same_value(point.get(key), value)
        else:  # judged by its stand-ins, and by its own value where a deep check read it
            differs = (any(held.get(k) != wanted.get(k) for k in stand_ins)
                       or (key in point and not same_value(point[key], value)))
        if differs:
            changed[key] = value
    return changed


def same_value(held: Any, sent: Any) -> bool:
    """Whether a JSON value a point holds is the one that was written: floats (and a float
    against an int) within FLOAT_REL_TOL, through objects and arrays; everything else
    exact, of the same type, so true is not 1 and "1" is not 1."""
    if isinstance(held, float) or isinstance(sent, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (held, sent))
        return numbers and math.isclose(held, sent, rel_tol=FLOAT_REL_TOL)
    if isinstance(sent, dict):
        return (isinstance(held, dict) and held.keys() == sent.keys()
                and all(same_value(held[k], v) for k, v in sent.items()))
    if isinstance(sent, list):
        return isinstance(held, list) and len(held) == len(sent) and all(map(same_value, held, sent))
    return type(held) is type(sent) and held == sent
