"""Settings in tables: the health endpoint's ([health], OUTBOXD_HEALTH__*), where
the vectors live ([qdrant], QDRANT_URL, OUTBOXD_QDRANT__*) and the model with its
backend ([embedding], OUTBOXD_EMBEDDING__*) in the core, the Kafka transport's
([kafka], OUTBOXD_KAFKA__*, KAFKA_BOOTSTRAP_SERVERS) in its wing. Each flat name
a deployment already sets (OUTBOXD_KAFKA_TOPIC, OUTBOXD_HEALTH_PORT, OUTBOXD_MODEL,
OUTBOXD_QDRANT_PATH, kafka_topic in the config file) keeps working with a
warning naming the new one; old and new set to different values is exit 78;
the name check knows every table's names for every command; a bad value is
named where it was set, with the choices where there are some."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.settings import KafkaSettings, StreamSettings
from daemon import cli, wings
from daemon.commands.options import every_settings_class, load_settings, settings_class
from daemon.config import Settings
from daemon.core.settings import QdrantSettings
from daemon.embedding.settings import EmbeddingShared, HttpSettings, OnnxSettings, SentenceTransformersSettings
from daemon.errors import EXIT_CONFIG, ConfigError
from daemon.settings.check import check_names
from daemon.settings.names import settings_of
from tests.conftest import REPO

STREAM = "consumers.settings:StreamSettings"
CONVENTIONAL = ("DATABASE_URL", "QDRANT_URL", "QDRANT_API_KEY", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SASL_PASSWORD",
                "EMBEDDING_API_KEY")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("OUTBOXD_") or key in CONVENTIONAL or key.endswith("_FILE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OUTBOXD_LOG_FORMAT", "text")
    monkeypatch.chdir(tmp_path)  # no .env of the checkout


def stream(config=None, **flags):
    return load_settings(config, flags, strict=False, settings=STREAM)


# --- where the settings live ------------------------------------------------------------
def test_the_core_settings_have_no_kafka_setting_and_the_wing_has_them_all():
    assert not [name for name in Settings.model_fields if "kafka" in name]
    assert not [s for s in settings_of(Settings) if any("KAFKA" in v for v in s.names)]
    assert set(KafkaSettings.model_fields) == {
        "bootstrap_servers", "topic", "dead_letter_topic", "group", "client_id", "create_topics", "partitions",
        "replication_factor", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
        "ssl_cafile", "ssl_certfile", "ssl_keyfile",
    }
    assert set(Settings.model_fields["health"].annotation.model_fields) == {"port", "host", "heartbeat_timeout"}


def test_a_command_names_its_settings_class_and_status_falls_back_without_the_wing(monkeypatch):
    """relay, consume and tail build the wing's class; `status` asks for it by name and
    builds the core's where the wing is not installed, and the name check then knows
    only the core's names."""
    assert settings_class() is Settings and settings_class(STREAM) is StreamSettings
    assert settings_class("stream_settings") is StreamSettings
    assert every_settings_class() == [Settings, StreamSettings]
    monkeypatch.setitem(wings.PLUGINS, "stream_settings", "no_such_wing.settings:StreamSettings")
    assert settings_class("stream_settings") is Settings
    assert every_settings_class() == [Settings]


def test_the_derived_kafka_values():
    s = StreamSettings(worker_name="w1", kafka={"topic": "chunks.v1"})
    assert (s.kafka.dead_letter_topic, s.kafka.client_id) == ("chunks.v1.dlq", "outboxd-w1")
    s = StreamSettings(kafka={"dead_letter_topic": "dead", "client_id": "me"})
    assert (s.kafka.dead_letter_topic, s.kafka.client_id) == ("dead", "me")


# --- new names -----------------------------------------------------------------------------
def test_the_new_names_set_the_tables(monkeypatch, tmp_path):
    monkeypatch.setenv("OUTBOXD_KAFKA__TOPIC", "docs.chunks")
    monkeypatch.setenv("OUTBOXD_KAFKA__PARTITIONS", "3")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "a:9092,b:9092")
    monkeypatch.setenv("OUTBOXD_HEALTH__PORT", "9464")
    monkeypatch.setenv("OUTBOXD_HEALTH__HEARTBEAT_TIMEOUT", "30")
    (tmp_path / ".env").write_text("OUTBOXD_KAFKA__GROUP=from-dotenv\nOUTBOXD_HEALTH__HOST=127.0.0.1\n")
    s, warnings = stream()
    assert warnings == []
    assert (s.kafka.topic, s.kafka.partitions, s.kafka.bootstrap_servers, s.kafka.group) == (
        "docs.chunks", 3, "a:9092,b:9092", "from-dotenv")
    assert (s.health.port, s.health.host, s.health.heartbeat_timeout) == (9464, "127.0.0.1", 30.0)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.setenv("OUTBOXD_KAFKA__BOOTSTRAP_SERVERS", "c:9092")
    assert stream()[0].kafka.bootstrap_servers == "c:9092"


def test_the_tables_in_the_config_file(monkeypatch, tmp_path):
    config = tmp_path / "outboxd.toml"
    config.write_text('[kafka]\ntopic = "docs.chunks"\npartitions = 12\n[health]\nport = 9464\n')
    monkeypatch.setenv("OUTBOXD_KAFKA__PARTITIONS", "3")  # the environment wins over the file
    s, warnings = stream(config)
    assert warnings == []
    assert (s.kafka.topic, s.kafka.partitions, s.health.port) == ("docs.chunks", 3, 9464)


def test_qdrant_and_embedding_are_tables(monkeypatch, tmp_path):
    """[qdrant] and [embedding] by their new names: QDRANT_URL stays conventional (no
    warning); a shared embedding setting alone is the default backend's, and every
    backend has the shared ones beside its own."""
    qdrant = Settings.model_fields["qdrant"].annotation
    assert set(qdrant.CONNECTION) == {"url", "api_key", "ca_file", "path", "timeout", "prefer_grpc", "grpc_port"}
    assert set(qdrant.CONNECTION) < set(qdrant.model_fields)  # the collection's own configuration beside it
    assert not [name for name in Settings.model_fields if name.startswith(("qdrant_", "embed"))
                and name != "embedding"]
    for member in (SentenceTransformersSettings, OnnxSettings, HttpSettings):
        assert issubclass(member, EmbeddingShared)
    monkeypatch.setenv("QDRANT_URL", "https://q.example:6333")
    monkeypatch.setenv("OUTBOXD_QDRANT__TIMEOUT", "5")
    monkeypatch.setenv("OUTBOXD_QDRANT__PREFER_GRPC", "true")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__NAME", "org/model")
    (tmp_path / ".env").write_text("OUTBOXD_EMBEDDING__BATCH_SIZE=16\nOUTBOXD_QDRANT__GRPC_PORT=7334\n")
    s, warnings = stream()
    assert warnings == []
    assert (s.qdrant.url, s.qdrant.timeout, s.qdrant.prefer_grpc, s.qdrant.grpc_port) == (
        "https://q.example:6333", 5.0, True, 7334)
    assert isinstance(s.embedding, SentenceTransformersSettings)
    assert (s.embedding.name, s.embedding.batch_size, s.embedding.normalize) == ("org/model", 16, True)
    monkeypatch.setenv("OUTBOXD_EMBEDDING__BACKEND", "http")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__URL", "http://tei:8080")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__MODEL", "served-name")  # http's own: the name it sends
    s, _ = stream()
    assert isinstance(s.embedding, HttpSettings)
    assert (s.embedding.name, s.embedding.model, s.embedding.batch_size) == ("org/model", "served-name", 16)


def test_qdrant_and_embedding_tables_in_the_config_file(monkeypatch, tmp_path):
    config = tmp_path / "outboxd.toml"
    config.write_text('[qdrant]\npath = "/var/q"\ntimeout = 9\n'
                      '[embedding]\nname = "org/model"\nbackend = "onnx"\nquantize = true\ncache_size = 0\n')
    monkeypatch.setenv("OUTBOXD_QDRANT__TIMEOUT", "3")  # the environment wins over the file
    s, warnings = stream(config)
    assert warnings == []
    assert (s.qdrant.path, s.qdrant.timeout, s.local_qdrant_path) == (Path("/var/q"), 3.0, "/var/q")
    assert isinstance(s.embedding, OnnxSettings)
    assert (s.embedding.name, s.embedding.quantize, s.embedding.cache_size) == ("org/model", True, 0)


def test_the_model_flags_set_the_embedding_table_and_a_bad_one_is_named_as_the_flag(monkeypatch):
    """reindex's --model, --max-seq-length and --normalize set [embedding] name,
    max_seq_length and normalize over the environment, keeping the rest of the table."""
    monkeypatch.setenv("OUTBOXD_EMBEDDING__NAME", "from/env")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__BATCH_SIZE", "16")
    s, _ = stream(model="from/flag", max_seq_length=128, normalize=False)
    assert (s.embedding.name, s.embedding.max_seq_length, s.embedding.normalize, s.embedding.batch_size) == (
        "from/flag", 128, False, 16)
    with pytest.raises(ConfigError, match="--max-seq-length: Input should be greater than or equal to 8"):
        stream(max_seq_length=4)


def test_an_old_flat_keyword_in_code_is_refused_naming_the_new_one():
    """In code an unknown keyword would be ignored like an unknown variable, and a
    test or tool that passed qdrant_path would silently use another Qdrant."""
    with pytest.raises(TypeError, match=r"qdrant_path is now qdrant\.path"):
        Settings(qdrant_path="/q")
    with pytest.raises(TypeError, match=r"embed_batch_size is now embedding\.batch_size"):
        Settings(embed_batch_size=8)
    assert Settings(qdrant=QdrantSettings(path="/q")).local_qdrant_path == "/q"


def test_each_backend_is_built_from_its_own_member_alone(tmp_path):
    """A backend receives its own settings with the shared ones, typed; nothing else
    of the process's settings."""
    from daemon.embedding.http_backend import HttpBackend

    http = {"backend": "http", "url": "http://tei:8080", "name": "org/m"}
    backend = Settings(database_url=None, embedding=http).embedding.build(tmp_path)
    assert isinstance(backend, HttpBackend) and backend.model == "org/m"  # the shared name, sent by default
    assert Settings(embedding={**http, "model": "served"}).embedding.build(tmp_path).model == "served"


# --- old names -----------------------------------------------------------------------------
OLD_AND_NEW = [
    ("OUTBOXD_KAFKA_TOPIC", "OUTBOXD_KAFKA__TOPIC", "kafka.topic", "docs.chunks", "docs.chunks"),
    ("OUTBOXD_KAFKA_GROUP", "OUTBOXD_KAFKA__GROUP", "kafka.group", "g1", "g1"),
    ("OUTBOXD_KAFKA_PARTITIONS", "OUTBOXD_KAFKA__PARTITIONS", "kafka.partitions", "12", 12),
    ("OUTBOXD_KAFKA_BOOTSTRAP_SERVERS", "OUTBOXD_KAFKA__BOOTSTRAP_SERVERS", "kafka.bootstrap_servers", "a:1", "a:1"),
    ("OUTBOXD_KAFKA_SECURITY_PROTOCOL", "OUTBOXD_KAFKA__SECURITY_PROTOCOL", "kafka.security_protocol", "SSL", "SSL"),
    ("OUTBOXD_KAFKA_SSL_CAFILE", "OUTBOXD_KAFKA__SSL_CAFILE", "kafka.ssl_cafile", "/ca.pem", "/ca.pem"),
    ("OUTBOXD_HEALTH_PORT", "OUTBOXD_HEALTH__PORT", "health.port", "9464", 9464),
    ("OUTBOXD_HEALTH_HOST", "OUTBOXD_HEALTH__HOST", "health.host", "127.0.0.1", "127.0.0.1"),
    ("OUTBOXD_HEARTBEAT_TIMEOUT", "OUTBOXD_HEALTH__HEARTBEAT_TIMEOUT", "health.heartbeat_timeout", "30", 30.0),
    ("OUTBOXD_QDRANT_URL", "OUTBOXD_QDRANT__URL", "qdrant.url", "http://q:6333", "http://q:6333"),
    ("OUTBOXD_QDRANT_PATH", "OUTBOXD_QDRANT__PATH", "qdrant.path", "/q", Path("/q")),
    ("OUTBOXD_QDRANT_CA_FILE", "OUTBOXD_QDRANT__CA_FILE", "qdrant.ca_file", "/ca.pem", Path("/ca.pem")),
    ("OUTBOXD_QDRANT_TIMEOUT", "OUTBOXD_QDRANT__TIMEOUT", "qdrant.timeout", "5", 5.0),
    ("OUTBOXD_QDRANT_PREFER_GRPC", "OUTBOXD_QDRANT__PREFER_GRPC", "qdrant.prefer_grpc", "true", True),
    ("OUTBOXD_QDRANT_GRPC_PORT", "OUTBOXD_QDRANT__GRPC_PORT", "qdrant.grpc_port", "7334", 7334),
    ("OUTBOXD_MODEL", "OUTBOXD_EMBEDDING__NAME", "embedding.name", "org/model", "org/model"),
    ("OUTBOXD_DEVICE", "OUTBOXD_EMBEDDING__DEVICE", "embedding.device", "cpu", "cpu"),
    ("OUTBOXD_MAX_SEQ_LENGTH", "OUTBOXD_EMBEDDING__MAX_SEQ_LENGTH", "embedding.max_seq_length", "128", 128),
    ("OUTBOXD_NORMALIZE", "OUTBOXD_EMBEDDING__NORMALIZE", "embedding.normalize", "false", False),
    ("OUTBOXD_EMBED_BATCH_SIZE", "OUTBOXD_EMBEDDING__BATCH_SIZE", "embedding.batch_size", "16", 16),
    ("OUTBOXD_EMBED_CACHE_SIZE", "OUTBOXD_EMBEDDING__CACHE_SIZE", "embedding.cache_size", "5", 5),
]
QDRANT_AND_EMBEDDING = [row for row in OLD_AND_NEW if row[2].startswith(("qdrant.", "embedding."))]


def value(settings, dotted: str):
    table, name = dotted.split(".")
    got = getattr(getattr(settings, table), name)
    return str(got) if name == "ssl_cafile" else got


@pytest.mark.parametrize("old, new, dotted, raw, expected", OLD_AND_NEW)
def test_an_old_name_still_works_with_a_warning_naming_the_new_one(monkeypatch, tmp_path, old, new, dotted, raw,
                                                                   expected):
    monkeypatch.setenv(old, raw)
    s, warnings = stream()
    assert value(s, dotted) == expected
    assert len(warnings) == 1 and old in warnings[0] and "deprecated" in warnings[0] and new in warnings[0]
    monkeypatch.setenv(new, raw)  # both, the same value: still one warning, no conflict
    assert value(stream()[0], dotted) == expected
    monkeypatch.delenv(old)
    monkeypatch.delenv(new)
    (tmp_path / ".env").write_text(f"{old}={raw}\n")
    s, warnings = stream()
    assert value(s, dotted) == expected and old in warnings[0] and ".env" in warnings[0]


def test_an_old_name_warns_through_the_cli(monkeypatch, capsys):
    """Every command warns about a deprecated name it finds, the Kafka wing's too
    (one environment file often serves several units)."""
    monkeypatch.setenv("OUTBOXD_HEALTH_PORT", "9464")
    monkeypatch.setenv("OUTBOXD_KAFKA_TOPIC", "docs.chunks")
    assert cli.main(["roles"]) == 0
    err = capsys.readouterr().err
    assert "OUTBOXD_HEALTH_PORT is deprecated: set OUTBOXD_HEALTH__PORT instead" in err
    assert "OUTBOXD_KAFKA_TOPIC is deprecated: set OUTBOXD_KAFKA__TOPIC instead" in err
    assert "unknown" not in err


def test_old_config_keys_still_work_with_a_warning(tmp_path):
    config = tmp_path / "outboxd.toml"
    config.write_text('kafka_topic = "docs.chunks"\nkafka_partitions = 12\nhealth_port = 9464\n'
                      'heartbeat_timeout = 30\n[kafka]\ngroup = "g"\n')
    s, warnings = stream(config)
    assert (s.kafka.topic, s.kafka.partitions, s.kafka.group) == ("docs.chunks", 12, "g")
    assert (s.health.port, s.health.heartbeat_timeout) == (9464, 30.0)
    said = "\n".join(warnings)
    for old, new in (("kafka_topic", "[kafka] topic"), ("health_port", "[health] port"),
                     ("heartbeat_timeout", "[health] heartbeat_timeout")):
        assert f"config key {old!r} in {config} is deprecated: use {new} instead" in said


@pytest.mark.parametrize("old, new, dotted, raw, expected", [OLD_AND_NEW[0], OLD_AND_NEW[6], OLD_AND_NEW[8],
                                                            *QDRANT_AND_EMBEDDING])
def test_old_and_new_set_to_different_values_exit_78_naming_both(monkeypatch, capsys, old, new, dotted, raw,
                                                                 expected):
    monkeypatch.setenv(old, raw)
    monkeypatch.setenv(new, raw + "1")
    with pytest.raises(ConfigError) as refused:
        stream()
    assert refused.value.exit_code == EXIT_CONFIG
    assert old in str(refused.value) and new in str(refused.value) and "different values" in str(refused.value)
    if not dotted.startswith("kafka"):  # a core command, through the CLI
        assert cli.main(["roles"]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert old in err and new in err and "Traceback" not in err


def test_a_conventional_name_and_its_prefixed_one_may_not_disagree(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "a:9092")
    monkeypatch.setenv("OUTBOXD_KAFKA__BOOTSTRAP_SERVERS", "b:9092")
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS and OUTBOXD_KAFKA__BOOTSTRAP_SERVERS are set"):
        stream()


def test_an_old_config_key_and_its_table_may_not_disagree(tmp_path):
    config = tmp_path / "outboxd.toml"
    config.write_text('kafka_topic = "a"\n[kafka]\ntopic = "b"\n')
    with pytest.raises(ConfigError) as refused:
        stream(config)
    assert "kafka_topic" in str(refused.value) and "[kafka] topic" in str(refused.value)
    assert str(config) in str(refused.value)


# --- secrets in tables ----------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["KAFKA_SASL_PASSWORD_FILE", "OUTBOXD_KAFKA__SASL_PASSWORD_FILE",
                                      "OUTBOXD_KAFKA_SASL_PASSWORD_FILE"])
def test_a_secret_in_a_table_is_read_from_its_file(monkeypatch, tmp_path, variable):
    secret = tmp_path / "sasl"
    secret.write_text("  s3cr3t-pw\n")
    monkeypatch.setenv(variable, str(secret))
    s, _ = stream()
    assert s.kafka.sasl_password.get_secret_value() == "s3cr3t-pw"
    assert "s3cr3t-pw" in s.secret_values()  # what the logs and the health endpoint hide


def test_a_secret_in_a_table_set_twice_exits_78_without_the_secret(monkeypatch, tmp_path, capsys):
    secret = tmp_path / "sasl"
    secret.write_text("s3cr3t-pw\n")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "0ther-pw")
    with pytest.raises(ConfigError) as refused:
        stream()
    said = str(refused.value)
    assert refused.value.exit_code == EXIT_CONFIG
    assert "KAFKA_SASL_PASSWORD and KAFKA_SASL_PASSWORD_FILE are both set" in said
    assert "s3cr3t" not in said and "0ther" not in said
    monkeypatch.delenv("KAFKA_SASL_PASSWORD")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="KAFKA_SASL_PASSWORD_FILE=.*: No such file"):
        stream()


@pytest.mark.parametrize("line", ['kafka_sasl_password = "pw"', '[kafka]\nsasl_password = "pw"'])
def test_a_secret_in_a_table_is_refused_in_the_config_file(tmp_path, capsys, line):
    config = tmp_path / "outboxd.toml"
    config.write_text(line + "\n")
    assert cli.main(["roles", "--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "sasl_password" in err and "_FILE" in err and '"pw"' not in err


# --- the name check -------------------------------------------------------------------------
@pytest.mark.parametrize("variable, meant", [
    ("OUTBOXD_KAFKA__TOPPIC", "OUTBOXD_KAFKA__TOPIC"),
    ("OUTBOXD_HEALTH__PROT", "OUTBOXD_HEALTH__PORT"),
    ("OUTBOXD_VERIFY__CHUNKS_PER_SECONDS", "OUTBOXD_VERIFY__CHUNKS_PER_SECOND"),
    ("OUTBOXD_KAFKA_TOPPIC", "OUTBOXD_KAFKA__TOPIC"),  # close to an old name: the new one is suggested
    ("OUTBOXD_HEALTH_PORTT", "OUTBOXD_HEALTH__PORT"),
])
def test_an_unknown_name_in_a_table_gets_did_you_mean_and_strict_refuses_it(monkeypatch, capsys, variable, meant):
    monkeypatch.setenv(variable, "1")
    for command in ("roles", "tail"):  # the core's commands know the wing's names too
        assert cli.main([command, "--strict"]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"unknown environment variable {variable}; did you mean {meant}?" in err, command
    assert cli.main(["roles"]) == 0
    assert f"did you mean {meant}? (ignored; --strict refuses it)" in capsys.readouterr().err


def test_an_unknown_key_in_a_table_of_the_config_file(tmp_path, capsys):
    config = tmp_path / "outboxd.toml"
    config.write_text('[kafka]\ntopik = "x"\n[health]\nprot = 1\n')
    assert cli.main(["roles", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "unknown config key [kafka] 'topik'; did you mean topic?" in err
    assert "unknown config key [health] 'prot'; did you mean port?" in err
    assert cli.main(["roles", "--config", str(config), "--strict"]) == EXIT_CONFIG


def test_every_new_and_old_name_is_known_to_the_name_check():
    """Every OUTBOXD_ name of every installed settings class (the wing's included,
    whichever command runs): known, and the old ones deprecated, not unknown."""
    environ, old = {}, set()
    for s in settings_of(StreamSettings):
        for name in s.names:
            if name.startswith("OUTBOXD_"):
                environ[name] = "1"
                if s.secret:
                    environ[f"{name}_FILE"] = "/x"
        if s.old:
            old.add(s.old_variable)
    config = {s.old: 1 for s in settings_of(StreamSettings) if s.old}
    names = check_names(every_settings_class(), environ, {}, config)
    assert names.unknown == []
    assert {line.split()[2] for line in names.deprecated if line.startswith("environment")} >= old
    assert len([line for line in names.deprecated if line.startswith("config key")]) == len(config) == 32


# --- a bad value, named where it was set ----------------------------------------------------
def test_a_mistyped_embedding_backend_lists_the_choices_and_suggests_one(monkeypatch, capsys):
    monkeypatch.setenv("OUTBOXD_EMBEDDING__BACKEND", "onxx")
    assert cli.main(["roles"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "OUTBOXD_EMBEDDING__BACKEND: 'onxx' is not one of sentence-transformers, onnx, http; did you mean onnx?" in err
    assert "Input tag" not in err and "OUTBOXD_EMBEDDING:" not in err


def test_a_bad_value_inside_a_backend_table_names_its_variable(monkeypatch, capsys):
    monkeypatch.setenv("OUTBOXD_EMBEDDING__BACKEND", "onnx")
    monkeypatch.setenv("OUTBOXD_EMBEDDING__THREADS", "0")
    assert cli.main(["roles"]) == EXIT_CONFIG
    assert "OUTBOXD_EMBEDDING__THREADS: Input should be greater than or equal to 1 (given: '0')" in (
        capsys.readouterr().err)


def test_the_log_level_is_read_in_either_case_and_its_choices_shown_as_the_flag_takes_them(monkeypatch, capsys):
    for given in ("debug", "DEBUG", "Warning"):
        monkeypatch.setenv("OUTBOXD_LOG_LEVEL", given)
        assert Settings().log_level == given.upper()
    monkeypatch.setenv("OUTBOXD_LOG_LEVEL", "verbose")
    assert cli.main(["roles"]) == EXIT_CONFIG
    assert "OUTBOXD_LOG_LEVEL: 'verbose' is not one of debug, info, warning, error" in capsys.readouterr().err
    monkeypatch.setenv("OUTBOXD_LOG_LEVEL", "warn")
    assert cli.main(["roles"]) == EXIT_CONFIG
    assert "did you mean warning?" in capsys.readouterr().err


def test_a_bad_value_in_the_config_file_is_named_by_its_key_and_path(monkeypatch, tmp_path, capsys):
    config = tmp_path / "outboxd.toml"
    config.write_text('batch_size = "lots"\n[kafka]\npartitions = "many"\n')
    assert cli.main(["tail", "--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"batch_size in {config}: Input should be a valid integer" in err
    assert f"[kafka] partitions in {config}: Input should be a valid integer" in err
    assert "OUTBOXD_BATCH_SIZE" not in err
    monkeypatch.setenv("OUTBOXD_BATCH_SIZE", "plenty")  # the environment's value is the one validated
    assert cli.main(["tail", "--config", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "OUTBOXD_BATCH_SIZE: Input should be a valid integer" in err and "'plenty'" in err
    monkeypatch.delenv("OUTBOXD_BATCH_SIZE")
    (tmp_path / ".env").write_text("OUTBOXD_KAFKA_PARTITIONS=lots\n")
    assert cli.main(["tail", "--config", str(config)]) == EXIT_CONFIG
    assert "OUTBOXD_KAFKA_PARTITIONS in .env: Input should be a valid integer" in capsys.readouterr().err


def test_a_bad_kafka_choice_lists_the_choices(monkeypatch, capsys):
    monkeypatch.setenv("OUTBOXD_KAFKA__SECURITY_PROTOCOL", "SASL_SSl")
    assert cli.main(["tail"]) == EXIT_CONFIG
    assert ("OUTBOXD_KAFKA__SECURITY_PROTOCOL: 'SASL_SSl' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; "
            "did you mean SASL_SSL?") in capsys.readouterr().err


HEAVY = ("qdrant_client", "torch", "sentence_transformers", "psycopg", "numpy", "aiokafka", "httpx")
INVALID = """
import contextlib, io, json, sys
from daemon import cli, wings
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.main(sys.argv[1:])
print(json.dumps({{"code": code, "err": err.getvalue(), "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize("command", ["status", "run", "relay"])
def test_an_invalid_setting_is_reported_before_anything_heavy_is_imported(tmp_path, command):
    """A real process (nothing loaded by other tests): the message comes before
    qdrant-client, torch or psycopg are imported, so it comes at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOXD_")}
    result = subprocess.run(
        [sys.executable, "-c", INVALID.format(heavy=HEAVY), command], cwd=tmp_path, capture_output=True, text=True,
        env={**env, "PYTHONPATH": str(REPO), "OUTBOXD_BATCH_SIZE": "lots"}, timeout=60,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == EXIT_CONFIG and "OUTBOXD_BATCH_SIZE" in report["err"], report
    assert report["heavy"] == [], report
