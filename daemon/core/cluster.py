"""A collection's shards on a Qdrant cluster: where each shard's replicas are and
in what state, which shards have fewer active replicas than the collection's
replication factor, and the replications that bring them back up to it.

A raised replication factor changes only the collection's parameter: Qdrant
adds no replica to the shards that exist (it does for shards created later),
so `outboxd collection --apply` asks for each missing replica itself (through
QdrantStore.add_replicas, like every write). A single
node (cluster mode off) has every shard locally, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qdrant_client import AsyncQdrantClient, models

ACTIVE = models.ReplicaState.ACTIVE


@dataclass
class Shard:
    shard_id: int
    replicas: dict[int, str] = field(default_factory=dict)  # peer id -> state (Active, Dead, Partial, ...)

    @property
    def active(self) -> int:
        return sum(state == ACTIVE.value for state in self.replicas.values())

    def as_dict(self) -> dict:
        return {"shard": self.shard_id, "active": self.active,
                "replicas": {str(peer): state for peer, state in sorted(self.replicas.items())}}


@dataclass
class Placement:
    """Where a collection's shards live, as one node sees them."""

    peers: list[int]  # the cluster's peers (one, the node itself, where cluster mode is off)
    shards: list[Shard]
    replication_factor: int

    def degraded(self) -> list[Shard]:
        """Shards with fewer active replicas than the replication factor (as far as there are peers to hold them)."""
        wanted = min(self.replication_factor, len(self.peers))
        return [s for s in self.shards if s.active < wanted]

    def problems(self) -> list[str]:
        """One line per shard below its replication factor, for status and the operator."""
        return [
            f"shard {s.shard_id} has {s.active} active replica(s) of {self.replication_factor} configured "
            f"({', '.join(f'peer {p}: {st}' for p, st in sorted(s.replicas.items()))})"
            for s in self.degraded()
        ]

    def replications(self) -> list[models.ReplicateShard]:
        """The copies that bring every shard up to the replication factor: from an
        active replica to the peers holding the fewest replicas, never one that
        already holds (or is receiving) that shard."""
        load = {peer: 0 for peer in self.peers}
        for s in self.shards:
            for peer in s.replicas:
                load[peer] = load.get(peer, 0) + 1
        wanted = min(self.replication_factor, len(self.peers))
        ring = {peer: i for i, peer in enumerate(self.peers)}
        moves = []
        for s in self.shards:
            sources = [p for p, state in s.replicas.items() if state == ACTIVE.value]
            if not sources:
                continue  # no healthy copy to replicate from: Qdrant recovers it, not us
            after = ring.get(sources[0], 0)  # ties go to the next peer round the ring, as Qdrant places shards
            for _ in range(wanted - len(s.replicas)):
                free = sorted((p for p in self.peers if p not in s.replicas),
                              key=lambda p: (load[p], (ring[p] - after) % len(ring)))
                if not free:
                    break
                target = free[0]
                moves.append(models.ReplicateShard(shard_id=s.shard_id, from_peer_id=sources[0], to_peer_id=target))
                s.replicas[target] = "Initializing"
                load[target] += 1
        return moves


async def placement(client: AsyncQdrantClient, collection: str, replication_factor: int | None) -> Placement:
    """The shards of this collection and their replicas, as the node the client talks to sees them,
    against the replication factor the caller read from the collection (or has just given it)."""
    info = await client.collection_cluster_info(collection)
    status = await client.cluster_status()
    peers = sorted(int(p) for p in (getattr(status, "peers", None) or {})) or [info.peer_id]
    shards: dict[int, Shard] = {}
    for local in info.local_shards:
        shards.setdefault(local.shard_id, Shard(local.shard_id)).replicas[info.peer_id] = _state(local.state)
    for remote in info.remote_shards:
        shards.setdefault(remote.shard_id, Shard(remote.shard_id)).replicas[remote.peer_id] = _state(remote.state)
    return Placement(peers, [shards[k] for k in sorted(shards)], replication_factor or 1)


def _state(state: models.ReplicaState | str | None) -> str:
    return state.value if isinstance(state, models.ReplicaState) else str(state)
