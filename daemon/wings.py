"""What the core takes from its wings, by name: the core never imports
consumers/ (the Kafka wing), so `outboxd status`'s Kafka section and the wing's
settings class are found here by module path, and are None where the wing is
not installed."""
from __future__ import annotations

import importlib

# what the core takes from the Kafka wing, by name (the core never imports consumers/):
# `outboxd status`'s Kafka section, and the wing's settings class
PLUGINS: dict[str, str] = {
    "kafka_status": "consumers.kafka_clients:consumer_group_status",
    "stream_settings": "consumers.settings:StreamSettings",
}
# the wings' settings classes (each extends daemon.config.Settings with its table): every
# command's name check knows their names, so that one environment serves every command
WING_SETTINGS = ("stream_settings",)


def plugin(name: str):
    module, _, attribute = PLUGINS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def installed(name: str):
    """plugin(name), or None where its wing is not installed."""
    module = PLUGINS[name].partition(":")[0]
    try:
        return plugin(name)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
