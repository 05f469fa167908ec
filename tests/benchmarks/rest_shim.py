"""A Qdrant REST API served in-process by qdrant-client's local engine, for
measuring the server path without a server: the daemon's real REST client
(AsyncQdrantClient(url=...)) serialises every request and parses every answer
as it would against Qdrant, while the engine's own work, which a server does
in its own process, is timed apart (`engine_cpu`) and left out of the daemon's.

Not a Qdrant: only the endpoints outboxd and its tests use, enough for the
benchmarks and for running the suite with QDRANT_URL pointing at shim_server.
"""
from __future__ import annotations

import re
import time
from typing import Any

import httpx
import orjson
from qdrant_client import AsyncQdrantClient, models

C = r"/collections/(?P<c>[^/]+)"


def _default(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    raise TypeError(type(value).__name__)


class RestShim:
    def __init__(self) -> None:
        self.engine = AsyncQdrantClient(location=":memory:")
        self.engine_cpu = 0.0  # CPU seconds of the engine and of answering: the "server's" work
        self.requests = 0
        self.routes = [
            ("GET", r"(/collections)?/aliases$", self._aliases),
            ("POST", r"/collections/aliases$", self._update_aliases),
            ("GET", r"/collections$", self._collections),
            ("GET", C + r"/exists$", self._exists),
            ("PUT", C + r"/index$", self._index),
            ("POST", C + r"/points/batch$", self._batch),
            ("POST", C + r"/points/count$", self._count),
            ("POST", C + r"/points/scroll$", self._scroll),
            ("POST", C + r"/points/payload/delete$", self._delete_payload),
            ("POST", C + r"/points/query$", self._query),
            ("POST", C + r"/points/delete$", self._delete),
            ("POST", C + r"/points/payload$", self._set_payload),
            ("PUT", C + r"/points/payload$", self._overwrite_payload),
            ("PUT", C + r"/points$", self._upsert),
            ("POST", C + r"/points$", self._retrieve),
            ("PUT", C + r"$", self._create),
            ("PATCH", C + r"$", self._update),
            ("GET", C + r"$", self._info),
            ("DELETE", C + r"$", self._drop),
        ]

    def client(self, **kwargs) -> AsyncQdrantClient:
        return AsyncQdrantClient(url="http://qdrant-shim:6333", transport=httpx.MockTransport(self.handle), **kwargs)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        started = time.process_time()
        try:
            self.requests += 1
            body = orjson.loads(request.content) if request.content else {}
            for method, pattern, fn in self.routes:
                m = re.match(pattern, request.url.path)
                if m and request.method == method:
                    result = await fn(body, **m.groupdict())
                    return httpx.Response(200, content=orjson.dumps({"result": result, "status": "ok", "time": 0}, default=_default))
            return httpx.Response(404, content=orjson.dumps({"status": {"error": f"no route {request.url.path}"}}))
        except ValueError as exc:
            code = 409 if "already exists" in str(exc) else 400
            return httpx.Response(code, content=orjson.dumps({"status": {"error": str(exc)}, "time": 0}))
        finally:
            self.engine_cpu += time.process_time() - started

    async def _aliases(self, body):
        return await self.engine.get_aliases()

    async def _update_aliases(self, body):
        ops = models.ChangeAliasesOperation.model_validate(body).actions
        return await self.engine.update_collection_aliases(change_aliases_operations=ops)

    async def _collections(self, body):
        return await self.engine.get_collections()

    async def _exists(self, body, c):
        return {"exists": await self.engine.collection_exists(c)}

    async def _index(self, body, c):
        return {"operation_id": 0, "status": "completed"}

    async def _batch(self, body, c):
        ops = models.UpdateOperations.model_validate(body).operations
        return await self.engine.batch_update_points(c, ops)

    async def _count(self, body, c):
        return await self.engine.count(c, count_filter=body.get("filter"), exact=True)

    async def _scroll(self, body, c):
        req = models.ScrollRequest.model_validate(body)
        points, offset = await self.engine.scroll(c, scroll_filter=req.filter, limit=req.limit or 10, offset=req.offset,
                                                  with_payload=req.with_payload, with_vectors=req.with_vector or False)
        return {"points": points, "next_page_offset": offset}

    async def _delete_payload(self, body, c):
        req = models.DeletePayload.model_validate(body)
        return await self.engine.delete_payload(c, keys=req.keys, points=req.points)

    async def _query(self, body, c):
        req = models.QueryRequest.model_validate(body)
        return await self.engine.query_points(
            c, query=req.query, using=req.using, prefetch=req.prefetch, query_filter=req.filter,
            limit=req.limit or 10, offset=req.offset, score_threshold=req.score_threshold,
            with_payload=req.with_payload if req.with_payload is not None else False,
            with_vectors=req.with_vector or False,
        )

    async def _delete(self, body, c):
        selector = (models.PointIdsList(points=body["points"]) if "points" in body
                    else models.FilterSelector(filter=body["filter"]))
        return await self.engine.delete(c, points_selector=selector)

    async def _set_payload(self, body, c):
        req = models.SetPayload.model_validate(body)
        return await self.engine.set_payload(c, payload=req.payload, points=req.points or req.filter, key=req.key)

    async def _overwrite_payload(self, body, c):
        req = models.SetPayload.model_validate(body)
        return await self.engine.overwrite_payload(c, payload=req.payload, points=req.points or req.filter)

    async def _upsert(self, body, c):
        if "batch" in body:
            points = models.Batch.model_validate(body["batch"])
        else:
            points = [models.PointStruct.model_validate(p) for p in body["points"]]
        return await self.engine.upsert(c, points=points)

    async def _retrieve(self, body, c):
        req = models.PointRequest.model_validate(body)
        return await self.engine.retrieve(c, req.ids, with_payload=req.with_payload, with_vectors=req.with_vector or False)

    async def _create(self, body, c):
        req = models.CreateCollection.model_validate(body)
        if await self.engine.collection_exists(c):
            raise ValueError(f"Collection `{c}` already exists!")
        return await self.engine.create_collection(c, vectors_config=req.vectors, metadata=req.metadata)

    async def _update(self, body, c):
        return await self.engine.update_collection(c, metadata=body.get("metadata"))

    async def _info(self, body, c):
        return await self.engine.get_collection(c)

    async def _drop(self, body, c):
        return await self.engine.delete_collection(c)
