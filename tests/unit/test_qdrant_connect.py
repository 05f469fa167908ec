"""Building a Qdrant server client (daemon.core.qdrant_connect.make_client): what
qdrant-client would print raw becomes outboxd's own log line. Building one opens
no connection, so no server is needed."""
from __future__ import annotations

import asyncio
import logging
import warnings
from types import SimpleNamespace

import pytest

from daemon.config import Settings
from daemon.core import qdrant_connect
from daemon.core.qdrant_connect import make_client
from daemon.core.qdrant_store import resolve_alias


@pytest.fixture
def fresh_process():
    """As in a new process: the once-per-process log line not yet given."""
    qdrant_connect._insecure_key.cache_clear()
    yield
    qdrant_connect._insecure_key.cache_clear()


def build(settings: Settings) -> list[warnings.WarningMessage]:
    """Build a client and close it; the warnings that reached Python's warning machinery."""
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        client = make_client(settings)
    asyncio.run(client.close())
    return raw


def test_an_api_key_over_http_is_one_log_line_not_a_raw_warning(fresh_process, caplog):
    settings = Settings(qdrant={"url": "http://qdrant.internal:6333", "api_key": "k3y-over-http"})
    with caplog.at_level(logging.WARNING, logger=qdrant_connect.__name__):
        raw = build(settings) + build(settings)  # twice: still one line per process

    assert [str(w.message) for w in raw] == []
    lines = [r for r in caplog.records if r.name == qdrant_connect.__name__]
    assert [(r.levelno, r.getMessage()) for r in lines] == [(
        logging.WARNING,
        ("the Qdrant API key travels unencrypted: QDRANT_URL is http://, so anyone on the network path can "
         "read the key; use an https:// URL"),
    )]
    assert "k3y-over-http" not in caplog.text


@pytest.mark.parametrize("url, key", [("https://qdrant.internal:6333", "k3y"), ("http://qdrant.internal:6333", None)])
def test_no_line_where_the_key_is_safe_or_absent(fresh_process, caplog, url, key):
    with caplog.at_level(logging.WARNING, logger=qdrant_connect.__name__):
        raw = build(Settings(qdrant={"url": url, "api_key": key}))
    assert [str(w.message) for w in raw] == []
    assert [r for r in caplog.records if r.name == qdrant_connect.__name__] == []


class _AliasRace:
    """A server where a concurrent starter creates the alias between our two looks:
    the first alias listing misses it, and "exists" answers for the alias."""

    def __init__(self) -> None:
        self.listings = 0

    async def get_aliases(self):
        self.listings += 1
        found = [SimpleNamespace(alias_name="chunks", collection_name="chunks__abc")] if self.listings > 1 else []
        return SimpleNamespace(aliases=found)

    async def collection_exists(self, name: str) -> bool:
        return True


def test_an_alias_created_between_two_looks_is_not_taken_for_a_plain_collection():
    assert asyncio.run(resolve_alias(_AliasRace(), "chunks")) == "chunks__abc"
