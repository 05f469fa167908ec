"""What a transport hands the apply core for one batch, and what comes back.

A Target is one chunk's wanted state: the current state (None: the chunk is
gone) and, where the transport has one (Kafka), the version of the event it
came from. An Outcome says which chunks now reflect which state (`written`:
chunk id -> state hash, None for gone) and which failed by their own fault
(`failed`: chunk id -> why); each stage has its own Outcome subclass with its
counts (the apply core's ApplyResult, the relay's PublishResult).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from uuid import UUID

from daemon.core.chunk_state import ChunkState
from daemon.core.plan import wants_no_point


@dataclass(frozen=True, slots=True)
class Target:
    state: ChunkState | None
    version: int | None = None  # Kafka: newer wins; a point that reflects a newer version is left alone
    deleted: int | None = None  # Kafka: the version of a delete of this chunk this process applied (plan())

    @property
    def removes_point(self) -> bool:
        """Gone, or no text worth embedding: the point must not exist (plan's rule)."""
        return wants_no_point(self.state)

    @property
    def state_hash(self) -> str | None:
        return self.state.state_hash if self.state is not None else None


Targets = dict[UUID, Target]


@dataclass
class Outcome:
    written: dict[UUID, str | None] = field(default_factory=dict)
    failed: dict[UUID, str] = field(default_factory=dict)

    def embedding_kinds(self) -> dict[str, int]:
        """How each written chunk's vector was obtained (the embeddings metric); none where nothing is embedded."""
        return {}

    def ops(self) -> dict[str, int]:
        """Chunks per op label of the events_applied metric (upsert, payload, delete, ...)."""
        raise NotImplementedError

    @classmethod
    def op_for(cls, target: Target) -> str:
        """The op label a failed chunk is counted under."""
        return "delete" if target.removes_point else "upsert"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Every field a subclass adds is one of its counters, declared where it is defined:
        # anything else would be summed by merge() and handed to the process's Stats.
        for name, kind in vars(cls).get("__annotations__", {}).items():
            if kind not in (int, "int") and not str(kind).startswith(("ClassVar", "typing.ClassVar")):
                raise TypeError(f"{cls.__name__}.{name} is typed {kind}: the fields an Outcome adds are its "
                                "counters and must be int; declare other attributes as ClassVar")

    @classmethod
    def counters(cls) -> tuple[str, ...]:
        """The counters this outcome declares: the fields its subclass adds to written and failed.
        The process's Stats must keep each of them (it refuses one it does not know)."""
        own = {f.name for f in fields(Outcome)}
        return tuple(f.name for f in fields(cls) if f.name not in own)

    def counts(self) -> dict[str, int]:
        """This outcome's counters and their values, for stats, logs and spans."""
        return {name: getattr(self, name) for name in self.counters()}

    def merge(self, other: "Outcome") -> None:
        self.written.update(other.written)
        self.failed.update(other.failed)
        for name, value in other.counts().items():
            setattr(self, name, getattr(self, name) + value)
