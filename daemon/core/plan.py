"""What Qdrant must hold for one chunk, decided in one place.

`plan(state, point, model_id)` compares a chunk's current state with what its
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
the version (a set includes it among the keys it sets). Bulky keys are judged by the key that stands for them:
text by content_hash, metadata by metadata_hash; where the point holds the
bulky key itself (a deep check reads it), its value is compared too. Values are
compared as the store keeps them (same_value): a float within FLOAT_REL_TOL of
the one sent is the same float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from daemon.core.chunk_state import METADATA_HASH, ChunkState
from daemon.errors import InvalidChunkError

# payload key: the event version a point reflects, where the targets carry versions (Kafka)
VERSION_KEY = "version"
# bulky key -> the key that stands for it (equal content_hash, equal text; equal metadata_hash, equal metadata)
BULK_KEYS = {"text": "content_hash", "metadata": METADATA_HASH}
# what is read of a point to plan it: enough to tell what changed, never its bulk
POINT_KEYS = ["document_id", "source_id", "chunk_index", "token_count", "content_hash", "title", "url",
              "document_type", "embedding_model", METADATA_HASH, VERSION_KEY]
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
    OLDER = "older"  # the point reflects a newer version than this target
    REJECT = "reject"  # no point can be made of this chunk (`error` says why)


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    drift: str | None = None  # missing, orphaned, stale, wrong_model; None: the point agrees
    payload: dict[str, Any] | None = None  # UPSERT: the whole payload; SET: the keys to set
    error: str | None = None  # REJECT: what is wrong with the chunk (names the field and the limit)


AGREES = Plan(Action.NOTHING)
OLDER = Plan(Action.OLDER)


def wants_no_point(state: ChunkState | None) -> bool:
    """Gone, or no text worth embedding: the chunk's point must not exist."""
    return state is None or not state.has_text


def plan(state: ChunkState | None, point: dict[str, Any] | None, model_id: str, version: int | None = None,
         deleted: int | None = None) -> Plan:
    """The plan for one chunk. point: the point's payload (POINT_KEYS at least),
    None where there is no point. version: the target's event version (Kafka);
    deleted: the version of a delete of this chunk that this process applied."""
    if version is not None:
        applied = point.get(VERSION_KEY) if point is not None else None
        if (isinstance(applied, int) and applied > version) or (deleted is not None and deleted > version):
            return OLDER
    if wants_no_point(state):
        return Plan(Action.DELETE, "orphaned") if point is not None else AGREES
    try:
        payload = state.payload(model_id)
    except InvalidChunkError as exc:
        return Plan(Action.REJECT, "missing" if point is None else "stale", error=str(exc))
    if version is not None:
        payload[VERSION_KEY] = version
    if point is None:
        return Plan(Action.UPSERT, "missing", payload)
    if point.get("embedding_model") != model_id:
        return Plan(Action.UPSERT, "wrong_model", payload)
    if point.get("content_hash") != state.content_hash:
        return Plan(Action.UPSERT, "stale", payload)
    changed = changed_keys(point, payload)
    if not changed:
        return AGREES
    return Plan(Action.SET, "stale", changed)


def changed_keys(point: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The payload keys to set: those that differ, a bulky one judged by the key
    that stands for it (and by its own value where the point holds it). Set, not
    overwrite: "truncated" belongs to the vector and stays, and one title or
    metadata change is then the same update for every chunk. A point without
    metadata_hash (written before it existed, or marked by a reconcile repair)
    gets its whole payload."""
    if METADATA_HASH not in point:
        return dict(payload)
    changed = {}
    for key, value in payload.items():
        stand_in = BULK_KEYS.get(key)
        if stand_in is None:
            differs = not same_value(point.get(key), value)
        else:  # judged by its stand-in, and by its own value where a deep check read it
            differs = point.get(stand_in) != payload[stand_in] or (key in point and not same_value(point[key], value))
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
