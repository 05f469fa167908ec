"""Where the vectors live: the `qdrant` table of daemon.config.Settings.

    QDRANT_URL=https://qdrant.internal:6333   (conventional; also OUTBOXD_QDRANT__URL)
    OUTBOXD_QDRANT__PREFER_GRPC=true          (or [qdrant] prefer_grpc = true in --config)

A Qdrant server (url, api_key, ca_file, the gRPC choice, the request timeout),
or qdrant-client's local mode in a folder (path); never both. The collection's
own configuration (its shape, which the operator chooses and every reindex
keeps) belongs in this table too, beside the connection. Read by
daemon.core.qdrant_connect; kept apart from it so that building the settings
imports only pydantic.

Before they had a table of their own these settings were flat (OUTBOXD_QDRANT_PATH,
`qdrant_path` in the config file); those names still work, with a warning that
names the new one (daemon.config.Settings.renamed).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr

from daemon.settings.names import Table


class QdrantSettings(Table):
    url: str | None = Field(
        None,
        validation_alias=AliasChoices("url", "QDRANT_URL"),
        description="Qdrant server URL. Unset: qdrant-client's local mode at --qdrant-path.",
    )
    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("api_key", "QDRANT_API_KEY"),
        description="API key for the Qdrant server.",
    )
    ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) that signs the Qdrant server's certificate, for an https QDRANT_URL "
        "(default: SSL_CERT_FILE where set, else the system's CAs); REST and gRPC both use it.",
    )
    path: Path | None = Field(
        None, description="Local-mode storage folder (default: <data-dir>/qdrant); ':memory:' keeps nothing."
    )
    timeout: float = Field(30.0, gt=0, description="Seconds one Qdrant request may take.")
    prefer_grpc: bool = Field(
        False, description="Talk to the Qdrant server over gRPC (faster bulk writes) instead of REST."
    )
    grpc_port: int = Field(6334, ge=1, le=65535, description="The Qdrant server's gRPC port.")
