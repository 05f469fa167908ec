"""Capture mode: which sessions chunk changes are captured in.

PostgreSQL fires a trigger according to its state (``pg_trigger.tgenabled``)
and the session's ``session_replication_role``: ENABLE ('origin') triggers fire
in ordinary sessions, ENABLE REPLICA ('replica') ones only under the replica
role, ENABLE ALWAYS ('always') ones in both. Under the replica role run bulk
loads, replays and sync tools that ``SET session_replication_role = replica``
(to skip foreign keys and the application's triggers), and a logical-
replication subscriber's apply and table-sync workers. The apply worker fires
only row-level triggers for the INSERT/UPDATE/DELETE it applies (PostgreSQL
docs, "Logical Replication > Architecture"), but the TRUNCATE statement
triggers for a replicated TRUNCATE.

Capture therefore has two paths. The statement-level triggers (one outbox
INSERT per statement, cheap for bulk writes) capture ordinary sessions in both
modes; row-level twins (one outbox INSERT per row, same rules: only
Qdrant-relevant changes, a primary-key change is an insert plus a delete, a
document's payload change refreshes its chunks) capture the replica role and
are off unless the mode is 'always'. TRUNCATE has only its statement trigger,
and the NOTIFY trigger on the outbox must fire for rows either path writes:

=============================================  =========  ========  ========
trigger (table)                                level      'origin'  'always'
=============================================  =========  ========  ========
outboxd_capture_insert (chunks)                statement  origin    origin
outboxd_capture_update (chunks)                statement  origin    origin
outboxd_capture_delete (chunks)                statement  origin    origin
outboxd_capture_document_update (documents)    statement  origin    origin
outboxd_capture_truncate (chunks)              statement  origin    always
outboxd_notify (outboxd.outbox)                statement  origin    always
outboxd_capture_row_insert (chunks)            row        disabled  replica
outboxd_capture_row_update (chunks)            row        disabled  replica
outboxd_capture_row_delete (chunks)            row        disabled  replica
outboxd_capture_row_document_update (docs)     row        disabled  replica
=============================================  =========  ========  ========

* 'origin' (the default after ``outboxd migrate``): ordinary sessions only.
  Whatever is written under the replica role never reaches the outbox, and
  the vector index silently stops following the table.
* 'always': every committed chunk change, whichever session or process made
  it, exactly once: an ordinary session fires only the statement path, a
  replica-role session or the apply worker only the row path (TRUNCATE and
  the NOTIFY fire in both, each once). On a subscriber that includes the
  initial table sync (each copied row is an 'insert') and every change the
  apply worker applies, a wake-up NOTIFY per applied transaction included.

Costs: in an ordinary session 'always' costs nothing more (the row triggers
do not fire there). Under the replica role each changed row costs one outbox
INSERT through a SECURITY DEFINER plpgsql function, plus the NOTIFY
trigger's statement.

Limits. ON DELETE CASCADE is itself a trigger that does not fire under the
replica role: deleting a document or source in such a session leaves its
chunks in place (nothing to capture; they drop out of outboxd.chunk_state),
whereas on a subscriber the publisher's cascaded chunk deletes arrive as
chunk deletes and are captured. Leave outboxd.* out of a publication: the
subscriber captures for itself, and replicated outbox rows would collide with
its own. ``ALTER TABLE ... DISABLE TRIGGER ALL`` (``pg_restore
--disable-triggers``, ``pg_dump --data-only --disable-triggers`` scripts)
stops every path; the matching ``ENABLE TRIGGER ALL`` then sets every trigger
to plain ENABLE, row triggers included, so ordinary writes are captured twice
and capture_mode() says 'mixed': run set_capture_mode again. For every write
made with the triggers off, ``outboxd reconcile`` (compare the table with
Qdrant, enqueue the differences) is the safety net.

capture_mode() reports 'origin' or 'always' when every trigger has that
mode's state; 'disabled' when ordinary writes are being missed (a trigger is
missing, or a statement-level one is disabled or fires only under the replica
role); 'mixed' otherwise (e.g. a row trigger disabled in an 'always' setup:
replica-role writes missed; or set to ENABLE/ENABLE ALWAYS: captured twice).
capture_triggers() lists each trigger with its state now and in each mode.

Switching takes a SHARE ROW EXCLUSIVE lock on documents, chunks and the
outbox until the transaction commits, and needs ownership of those tables:
outboxd.set_capture_mode is SECURITY DEFINER, owned by the role that ran the
migrations, and only that role (or one it grants EXECUTE to) may call it: not
the worker role. A call that changes nothing takes no lock.

``outboxd migrate --capture-triggers always|origin`` sets the mode;
``outboxd status`` and ``outboxd reconcile`` report it. All three functions
take a sync psycopg connection and leave transaction control to the caller:
in autocommit mode the switch commits at once; otherwise it commits with the
caller's transaction.
"""
from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from db.gateway import fetch
from db.queries import query

# The modes set_capture_mode accepts.
CAPTURE_MODES = ("origin", "always")
# Every answer capture_mode gives: the two modes, and the states that need an
# operator: 'mixed' (the triggers match neither mode: some changes are missed
# or captured twice) and 'disabled' (ordinary writes are being missed).
# set_capture_mode repairs either, provided no trigger is missing.
CAPTURE_STATES = (*CAPTURE_MODES, "mixed", "disabled")


def capture_mode(conn: psycopg.Connection) -> str | None:
    """The capture mode now: one of CAPTURE_STATES; None on a schema from before
    capture modes (0005: run `outboxd migrate`). Any role may ask."""
    try:
        return _one(conn, "capture_mode")["mode"]
    except psycopg.errors.UndefinedFunction:
        return None


async def read_capture_mode(pool) -> str | None:
    """capture_mode() through a process's pool."""
    try:
        return (await fetch(pool, "capture_mode"))[0]["mode"]
    except psycopg.errors.UndefinedFunction:
        return None


def capture_triggers(conn: psycopg.Connection) -> list[dict[str, str]]:
    """The outboxd triggers, for an operator to see which one disagrees:
    [{"table", "trigger", "level" ('statement' | 'row'), "enabled" (its state
    now: origin, always, replica, disabled or missing), "origin" and "always"
    (its state in each mode)}, ...]. Any role may ask."""
    return _one(conn, "capture_mode")["triggers"]


def set_capture_mode(conn: psycopg.Connection, mode: str) -> str:
    """Set every outboxd trigger to its state in `mode` ('origin' or 'always')
    and return the resulting capture mode. Idempotent. Raises ValueError for
    another mode (before touching the database); a psycopg error where the
    role may not switch (InsufficientPrivilege) or a trigger is missing
    (UndefinedObject)."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"invalid capture mode {mode!r}: expected one of {', '.join(CAPTURE_MODES)}")
    return _one(conn, "set_capture_mode", mode=mode)["mode"]


def _one(conn: psycopg.Connection, name: str, **params) -> dict:
    """The one row of a named query, by column name whatever the connection's row factory."""
    return conn.cursor(row_factory=dict_row).execute(query(name), params or None).fetchone()
