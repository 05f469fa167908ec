"""Structured logs: readable text on a terminal, JSON lines everywhere else.

Fields passed as `extra=` become JSON keys; a line logged inside a span (a batch)
carries its trace_id and span_id, to find the trace of a log line. Nothing here ever receives a DSN or
an API key: settings hold them as SecretStr, and errors are logged by type and
message only.
"""
from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import orjson

from daemon.telemetry import current_ids

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        ids = current_ids()
        if ids is not None:
            doc["trace_id"], doc["span_id"] = ids
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {record.levelname:<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries stay quiet unless something is wrong.
    for noisy in ("httpx", "httpcore", "sentence_transformers", "alembic", "psycopg.pool", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
